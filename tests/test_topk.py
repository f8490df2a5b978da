"""Top-k reduction (packager.topk): a parent or pruned checkpoint served at k=1 instead of 2
exports to GGUF and ONNX, and llama.cpp and ONNX Runtime match transformers at the reduced k
(F32, 1e-4 max abs on logits). A per-layer k (2 in one MoE layer, 1 in the other) exports to
ONNX with parity (Qwen3-MoE, and DeepSeek-V3's group-limited sigmoid routing) and is refused by
the GGUF exporter; bad k specs give one error line and write nothing."""
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

from converters.gguf.errors import GGUFExportError
from converters.gguf.export import export_gguf
from converters.gguf.gguf_file import field_value, open_gguf
from converters.onnx.check import compare_with_transformers, open_session
from converters.onnx.export import MODEL_FILE, export_onnx
from packager.core.errors import OutputExistsError
from packager.core.fingerprint import model_fingerprint
from packager.core.plan_file import Plan
from packager.prune import prune_checkpoint, read_provenance
from packager.topk import REDUCTION_NAME, TopKError, reduce_top_k
from runtime.backends import export_config_path, open_backend
from runtime.schema import ExportConfig


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


# ------------------------------------------------------------------------------ per-layer k
def _onnx_parity(out, model_dir, prompts):
    extra = ExportConfig.load(export_config_path(out / MODEL_FILE)).extra
    return compare_with_transformers(open_session(out / MODEL_FILE), hf(str(model_dir)), prompts, extra["n_layers"],
                                     extra["n_kv_heads"], extra["head_dim"], decode_steps=3)


def _moe_node_k(out) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    return {node.name: next(a.i for a in node.attribute if a.name == "k") for node in graph.node if node.op_type == "MoE"}


@pytest.fixture(scope="module")
def per_layer(tmp_path_factory):
    """The tiny ONNX parent (MoE layers 0 and 2, dense layer 1), its uniform k=1 copy and its 2/1 copy."""
    root = tmp_path_factory.mktemp("per_layer")
    parent = build_parent(root / "parent")
    return parent, reduce_top_k(parent, root / "k1", 1), reduce_top_k(parent, root / "k21", [2, 1])


def test_per_layer_checkpoint_and_transformers(per_layer):
    parent, k1, k21 = per_layer
    config = json.loads((k21 / "config.json").read_text())
    assert config["num_experts_per_tok"] == 2 and config["top_k_per_layer"] == [2, 0, 1]
    assert "top_k_per_layer" not in json.loads((k1 / "config.json").read_text())
    assert json.loads((k21 / REDUCTION_NAME).read_text())["top_k"] == {
        "from": 2, "to": [2, 1], "config_key": "num_experts_per_tok", "per_layer_key": "top_k_per_layer", "moe_layers": [0, 2]}
    assert len({model_fingerprint(parent), model_fingerprint(k1), model_fingerprint(k21)}) == 3
    model = hf(str(k21))
    assert [model.model.layers[i].mlp.gate.top_k for i in (0, 2)] == [2, 1]
    # 2/1 is neither the k=2 parent nor k=1 everywhere
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        logits = model(ids).logits
        for other in (parent, k1):
            assert (logits - hf(str(other))(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("formulation", ["contrib", "sparse"])
def test_onnx_parity_at_per_layer_top_k(formulation, per_layer, tmp_path):
    _, _, k21 = per_layer
    out = export_onnx(k21, tmp_path / "onnx", quant="fp32", formulation=formulation, hash_inputs=False)
    with open_backend(out, n_threads=1) as backend:
        prompts = [backend.prompt_ids(text, "en", "de") for text in harvest_sources(3)]
    prompts.append(list(range(5, 40)))
    report = _onnx_parity(out, k21, prompts)
    assert report.prefill_max_abs <= ONNX_TOLERANCE and report.decode_max_abs <= ONNX_TOLERANCE
    assert report.argmax_agreement == 1.0
    config = ExportConfig.load(export_config_path(out / MODEL_FILE))
    assert config.top_k == 2 and config.extra["top_k_per_layer"] == {"0": 2, "2": 1}
    if formulation == "contrib":
        assert _moe_node_k(out) == {"layers.0.mlp/moe": 2, "layers.2.mlp/moe": 1}


@pytest.mark.parametrize("formulation", ["contrib", "sparse"])
def test_onnx_parity_per_layer_top_k_sigmoid_group(formulation, tmp_path):
    from test_onnx import TEMPLATE, VOCAB, bpe_json
    from tiny_models import build_tiny

    parent = build_tiny("deepseek_v3", tmp_path / "parent", vocab_size=VOCAB)  # MoE layers 1 and 2
    (parent / "tokenizer.json").write_text(bpe_json())
    (parent / "chat_template.jinja").write_text(TEMPLATE)
    reduced = reduce_top_k(parent, tmp_path / "k12", [1, 2])
    assert json.loads((reduced / "config.json").read_text())["top_k_per_layer"] == [0, 1, 2]
    out = export_onnx(reduced, tmp_path / "onnx", quant="fp32", formulation=formulation, hash_inputs=False)
    prompts = [list(range(3, 20)), [7], list(range(30, 70))]
    report = _onnx_parity(out, reduced, prompts)
    assert report.prefill_max_abs <= ONNX_TOLERANCE and report.decode_max_abs <= ONNX_TOLERANCE
    if formulation == "contrib":
        assert _moe_node_k(out) == {"layers.1.mlp/moe": 1, "layers.2.mlp/moe": 2}
    ids = torch.tensor([prompts[2]])
    with torch.no_grad():
        assert (hf(str(reduced))(ids).logits - hf(str(parent))(ids).logits).abs().max() > 1e-3


def test_pruned_per_layer_equals_masked_parent(tmp_path):
    """Pruning then serving 2/1 equals the parent at 2/1 with the dropped experts masked
    (masking routes each layer at its own k)."""
    from test_onnx import KEEP_NONUNIFORM, prune

    from packager.masking import expert_mask

    parent = build_parent(tmp_path / "parent")
    reduced = reduce_top_k(parent, tmp_path / "k21", [2, 1])
    pruned = reduce_top_k(prune(parent, KEEP_NONUNIFORM, tmp_path / "pruned"), tmp_path / "pruned-k21", [2, 1])
    assert read_provenance(pruned)["top_k_reduction"] == {"from": 2, "to": [2, 1]}
    ids = torch.tensor([list(range(5, 40))])
    model = hf(str(reduced))
    with torch.no_grad(), expert_mask(model, KEEP_NONUNIFORM):
        masked = model(ids).logits
    with torch.no_grad():
        assert (hf(str(pruned))(ids).logits - masked).abs().max() <= 1e-5


def test_gguf_refuses_per_layer_top_k(tmp_path, monkeypatch, capsys):
    from packager_cli import run_cli

    parent = build_model("qwen3_moe", tmp_path / "parent")
    reduced = reduce_top_k(parent, tmp_path / "k21", [2, 1])
    with pytest.raises(GGUFExportError, match=r"config.json: top_k_per_layer .*\(2,1\).*expert_used_count.*ONNX"):
        export_gguf(reduced, tmp_path / "k21.gguf", None, dtype="f32")
    code, out, err = run_cli(monkeypatch, capsys, "export", "gguf", str(reduced), "--out", str(tmp_path / "k21.gguf"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--top-k K" in err
    assert not list(tmp_path.glob("*.gguf"))
    # the same model reduced uniformly still exports
    uniform = reduce_top_k(reduced, tmp_path / "k1", [1, 1])
    assert "top_k_per_layer" not in json.loads((uniform / "config.json").read_text())
    export_gguf(uniform, tmp_path / "k1.gguf", None, dtype="f32")


@pytest.mark.parametrize("spec, fragments", [
    ("1,1,1", ["3 values for 2 MoE layers [0, 1]"]),
    ("0,1", ["layer 0 needs a whole number from 1 to 2", "got 0"]),
    ("1,3", ["layer 1 needs a whole number from 1 to 2", "got 3"]),
    ("2,2", ["reduces no layer", "2,2"]),
    ("0", ["--top-k 0", "from 1 to 1"]),
    ("2", ["--top-k 2", "from 1 to 1"]),
    ("1.5", ["whole number"]), ("a,1", ["whole number"]), ("1,,1", ["whole number"]), ("-1", ["whole number"]),
])
def test_bad_top_k_specs_one_error(spec, fragments, tmp_path, monkeypatch, capsys):
    from test_prune_cli import assert_one_error

    parent = build_model("qwen3_moe", tmp_path / "parent")
    plan = Plan(model_fingerprint(parent), KEEP, {"ranker": "test"})
    plan.save(tmp_path / "plan.json")
    assert_one_error(monkeypatch, capsys, tmp_path, ["prune", str(parent), "--top-k", spec, "--out", str(tmp_path / "out")],
                     *fragments)
    # with a plan the k is checked before pruning: nothing is written either
    assert_one_error(monkeypatch, capsys, tmp_path, ["prune", str(parent), "--plan", str(tmp_path / "plan.json"),
                                                     "--top-k", spec, "--out", str(tmp_path / "out")], *fragments)


def test_prune_cli_top_k_alone_and_uniform_lists(tmp_path, monkeypatch, capsys):
    from test_prune_cli import run_cli

    parent = build_model("qwen3_moe", tmp_path / "parent")
    code, out, err = run_cli(monkeypatch, capsys, "prune", str(parent), "--top-k", "2,1", "--out", str(tmp_path / "k21"))
    assert code == 0, err
    assert "top-k 2,1 per MoE layer" in out
    assert json.loads((tmp_path / "k21" / "config.json").read_text())["top_k_per_layer"] == [2, 1]
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "k21"))
    assert code == 0 and "top-k per MoE layer 2,1" in out
    # a list with one k everywhere is the uniform reduction, byte for byte in config.json
    code, out, err = run_cli(monkeypatch, capsys, "prune", str(parent), "--top-k", "1,1", "--out", str(tmp_path / "k11"))
    assert code == 0, err
    reduce_top_k(parent, tmp_path / "k1", 1)
    assert (tmp_path / "k11" / "config.json").read_bytes() == (tmp_path / "k1" / "config.json").read_bytes()
    assert model_fingerprint(tmp_path / "k11") == model_fingerprint(tmp_path / "k1")
    assert json.loads((tmp_path / "k11" / REDUCTION_NAME).read_text())["top_k"] == {
        "from": 2, "to": 1, "config_key": "num_experts_per_tok"}
