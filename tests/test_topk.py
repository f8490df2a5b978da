"""Top-k reduction (packager.topk): a parent or pruned checkpoint served at k=1 instead of 2
exports to GGUF and ONNX, and llama.cpp and ONNX Runtime match transformers at the reduced k
(F32, 1e-4 max abs on logits)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_gguf import KEEP
from test_gguf import TOLERANCE as GGUF_TOLERANCE
from test_gguf import build_model, max_logit_diff
from test_onnx import TOLERANCE as ONNX_TOLERANCE
from test_onnx import build_parent, harvest_sources, hf

from converters.gguf.export import export_gguf
from converters.gguf.gguf_file import field_value, open_gguf
from converters.onnx.check import compare_with_transformers, open_session
from converters.onnx.export import MODEL_FILE, export_onnx
from packager.core.errors import OutputExistsError
from packager.core.fingerprint import model_fingerprint
from packager.core.plan_file import Plan
from packager.prune import prune_checkpoint, read_provenance
from packager.topk import REDUCTION_NAME, TopKError, reduce_top_k
from runtime.backends import open_backend


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_gguf_parity_at_reduced_top_k(family, tmp_path):
    parent = build_model(family, tmp_path / "parent")
    plan = Plan(model_fingerprint(parent), KEEP, {"ranker": "test", "drop_ratio": 0.5, "languages": ["de"]})
    pruned = prune_checkpoint(parent, plan, tmp_path / "pruned")
    for name, source in (("parent", parent), ("pruned", pruned)):
        reduced = reduce_top_k(source, tmp_path / f"{name}-k1", 1)
        config = json.loads((reduced / "config.json").read_text())
        assert config["num_experts_per_tok"] == 1
        out = export_gguf(reduced, tmp_path / f"{name}-k1.gguf", None, dtype="f32")
        reader = open_gguf(out)
        used = [field_value(reader, key) for key in reader.fields if key.endswith(".expert_used_count")]
        assert used == [1]
        assert max_logit_diff(out, reduced) <= GGUF_TOLERANCE
        # the reduced k changes the model: not the top-2 logits
        with open_backend(out, n_threads=1, parity=True) as k1:
            ids = k1.prompt_ids("Open the file", "en", "de")
            logits_k1 = k1.logits(ids)
        full = export_gguf(source, tmp_path / f"{name}-k2.gguf", None, dtype="f32")
        with open_backend(full, n_threads=1, parity=True) as k2:
            assert np.abs(k2.logits(ids) - logits_k1).max() > 1e-3
    record = read_provenance(tmp_path / "pruned-k1")
    assert record["top_k_reduction"] == {"from": 2, "to": 1}
    assert record["parent_fingerprint"] == model_fingerprint(parent)
    assert record["model_fingerprint"] == model_fingerprint(tmp_path / "pruned-k1")
    reduction = json.loads((tmp_path / "pruned-k1" / REDUCTION_NAME).read_text())
    assert reduction["input"]["fingerprint"] == model_fingerprint(pruned)


def test_onnx_parity_at_reduced_top_k(tmp_path):
    parent = build_parent(tmp_path / "parent")
    reduced = reduce_top_k(parent, tmp_path / "k1", 1)
    out = export_onnx(reduced, tmp_path / "k1-onnx", quant="fp32")
    with open_backend(out, n_threads=1) as backend:
        prompts = [backend.prompt_ids(text, "en", "de") for text in harvest_sources(3)]
    prompts.append(list(range(5, 40)))
    report = compare_with_transformers(open_session(out / MODEL_FILE), hf(str(reduced)), prompts, 3, 1, 16, decode_steps=3)
    assert report.prefill_max_abs <= ONNX_TOLERANCE and report.decode_max_abs <= ONNX_TOLERANCE
    assert report.argmax_agreement == 1.0
    # transformers at k=1 really routes one expert: differs from the k=2 parent
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert (hf(str(reduced))(ids).logits - hf(str(parent))(ids).logits).abs().max() > 1e-3


def test_bad_top_k_refused(tmp_path):
    parent = build_model("qwen3_moe", tmp_path / "parent")
    for bad in (0, 2, 3, True):
        with pytest.raises(TopKError, match="--top-k"):
            reduce_top_k(parent, tmp_path / "out", bad)
        assert not (tmp_path / "out").exists()
    reduce_top_k(parent, tmp_path / "out", 1)
    with pytest.raises(OutputExistsError):
        reduce_top_k(parent, tmp_path / "out", 1)


def test_prune_cli_with_top_k_and_merge(tmp_path, monkeypatch, capsys):
    from test_prune_cli import run_cli

    from packager.calibrate import CalibrationSettings, calibrate
    from packager.planning import PlanSettings, make_plan

    parent = build_model("qwen3_moe", tmp_path / "parent")
    records = [{"src_lang": "en", "tgt_lang": "de", "src": s, "tgt": s[::-1]} for s in harvest_sources(12)]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = calibrate(parent, [calib], CalibrationSettings(pairs=("en-de",), teacher_forced=True, batch_size=8))
    stats_path = tmp_path / "stats.safetensors"
    stats.save(stats_path)
    plan = make_plan(stats, PlanSettings(langs=("de",), drop_ratio=0.5, allocation="uniform"))
    plan.save(tmp_path / "plan.json")
    code, out, err = run_cli(monkeypatch, capsys, "prune", str(parent), "--plan", str(tmp_path / "plan.json"),
                             "--out", str(tmp_path / "out"), "--reduce", "merge", "--stats", str(stats_path),
                             "--calib", str(calib), "--top-k", "1")
    assert code == 0, err
    record = read_provenance(tmp_path / "out")
    assert record["reduce"] == "merge" and record["top_k_reduction"] == {"from": 2, "to": 1}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 1
    assert not list(tmp_path.glob(".out.*"))
    code, out, err = run_cli(monkeypatch, capsys, "prune", str(parent), "--plan", str(tmp_path / "plan.json"),
                             "--out", str(tmp_path / "bad"), "--reduce", "merge")
    assert code != 0 and "--stats" in err and len(err.strip().splitlines()) == 1
