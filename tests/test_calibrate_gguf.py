"""Calibration of a GGUF parent inside llama.cpp (issue 14): tiny models of every family that
exports to GGUF, as F32 GGUF, give the statistics of the transformers path (routing mass and
REAP within 1e-4 relative, selection and token counts identical), teacher-forced and
generated; the chain calibrate (GGUF) -> plan -> prune-gguf works with torch and
transformers blocked from import; bad input gets one error line and nothing is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from import_blocker import blocker
from packager_cli import RUNNER_SCRIPT

from converters.gguf.export import export_gguf
from packager.calibrate import calibrate
from packager.calibrate_gguf import calibrate_gguf
from packager.calibration_data import CalibrationError, CalibrationSettings
from packager.core.errors import PackagerError
from packager.core.stats import IDENTITY_KEYS, SETTING_KEYS, RoutingStats
from test_gguf import FAMILY_OVERRIDES, build_model

SENTENCES = [
    ("Open the file", "Datei öffnen"),
    ("The red cat is on the blue window.", "Die rote Katze ist auf dem blauen Fenster."),
    ("Save the document as %s", "Dokument als %s speichern"),
    ("Close", "Schließen"),
]
FAMILIES = ["qwen3_moe"] + sorted(FAMILY_OVERRIDES)
MASS_RTOL = 1e-4


def write_data(path: Path, pairs=SENTENCES) -> Path:
    path.write_text("".join(json.dumps({"src_lang": "en", "tgt_lang": "de", "src": s, "tgt": t}, ensure_ascii=False) + "\n"
                            for s, t in pairs), encoding="utf-8")
    return path


def compare(ours: RoutingStats, reference: RoutingStats) -> dict:
    """Agreement of two STATS: identity and settings equal, same tensors, counts equal,
    routing mass / REAP relative difference (to the largest value of the tensor)."""
    for key in IDENTITY_KEYS + SETTING_KEYS:
        assert ours.meta[key] == reference.meta[key], key
    assert sorted(ours.tensors) == sorted(reference.tensors)
    worst = {"mass": 0.0, "reap": 0.0}
    selection_mismatches = 0
    for name, ref in reference.tensors.items():
        signal = name.split("/")[0]
        value = ours.tensors[name]
        if signal in worst:
            worst[signal] = max(worst[signal], float(np.abs(value - ref).max() / max(np.abs(ref).max(), 1e-12)))
        elif signal == "selected":
            selection_mismatches += int(np.abs(value - ref).sum())
        else:  # tokens, sequences, reap_tokens
            np.testing.assert_array_equal(value, ref, err_msg=name)
    return {**worst, "selection_mismatches": selection_mismatches}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("calibrate_gguf")


_MODELS: dict[str, tuple[Path, Path]] = {}


def family_model(family: str, work: Path) -> tuple[Path, Path]:
    if family not in _MODELS:
        overrides = FAMILY_OVERRIDES.get(family, {})
        model_dir = build_model(family, work / family, **overrides)
        _MODELS[family] = (model_dir, export_gguf(model_dir, work / f"{family}.gguf", dtype="f32"))
    return _MODELS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_gives_the_transformers_statistics_teacher_forced(family, work):
    model_dir, gguf_file = family_model(family, work)
    data = write_data(work / "tf.jsonl")
    settings = CalibrationSettings(pairs=("en-de", "de-en"), teacher_forced=True, batch_size=3, max_sentences=None)
    reference = calibrate(model_dir, [data], settings)
    ours = calibrate_gguf(gguf_file, [data], settings, n_threads=1)
    agreement = compare(ours, reference)
    assert agreement["mass"] <= MASS_RTOL and agreement["reap"] <= MASS_RTOL, agreement
    assert agreement["selection_mismatches"] == 0, agreement
    assert ours.spans("en-de") == ["prompt", "source", "target", "sequence"]
    assert ours.meta["provenance"][0]["versions"]["llama-cpp-python"]


def test_f32_gguf_gives_the_transformers_statistics_generated(work):
    model_dir, gguf_file = family_model("qwen3_moe", work)
    data = write_data(work / "gen.jsonl")
    settings = CalibrationSettings(pairs=("en-de",), max_new_tokens=6, batch_size=4, max_sentences=None)
    reference = calibrate(model_dir, [data], settings)
    ours = calibrate_gguf(gguf_file, [data], settings, n_threads=1)
    agreement = compare(ours, reference)  # same generated tokens: counts equal
    assert agreement["mass"] <= MASS_RTOL and agreement["reap"] <= MASS_RTOL, agreement
    assert agreement["selection_mismatches"] == 0, agreement
    assert ours.spans() == ["prompt", "source", "generated", "sequence"]
    assert ours.meta["max_new_tokens"] == 6
    assert 0 < ours.get("tokens", "en-de", "generated")[0, 0] <= 6 * len(SENTENCES)


def test_batching_does_not_change_the_statistics(work, monkeypatch):
    """One sequence per decode, against four sequences per decode split into ubatches of 8
    tokens (so the callback sees every layer several times per decode, in order)."""
    import packager.calibrate_gguf as calibrate_gguf_module

    _, gguf_file = family_model("qwen3_moe", work)
    data = write_data(work / "b.jsonl")
    one = calibrate_gguf(gguf_file, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True, batch_size=1), n_threads=1)
    monkeypatch.setattr(calibrate_gguf_module, "N_UBATCH", 8)
    many = calibrate_gguf(gguf_file, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True, batch_size=16), n_threads=1)
    for name in one.tensors:
        np.testing.assert_allclose(many.tensors[name], one.tensors[name], rtol=1e-5, atol=1e-7, err_msg=name)


# ---- torch-free chain -----------------------------------------------------------------------------
def test_gguf_chain_runs_with_torch_and_transformers_blocked(work):
    _, gguf_file = family_model("qwen3_moe", work)
    data = write_data(work / "chain.jsonl")
    out = work / "chain"
    out.mkdir()
    script = blocker("torch", "transformers") + RUNNER_SCRIPT + textwrap.dedent(f"""
        run("calibrate", "{gguf_file}", "--data", "{data}", "--pairs", "en-de,de-en", "--teacher-forced", "--out", "{out}/s.st")
        run("plan", "create", "{out}/s.st", "--langs", "de", "--drop", "0.5", "--uniform", "--ranker", "reap", "--out", "{out}/plan.json")
        run("prune-gguf", "{gguf_file}", "--plan", "{out}/plan.json", "--out", "{out}/pruned.gguf")
        assert not any(name.split(".")[0] in ("torch", "transformers") for name in sys.modules)
        print("torch-free")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "statistics written to" in result.stdout and "torch-free" in result.stdout
    assert (out / "pruned.gguf").is_file()
    stats = RoutingStats.load(out / "s.st")
    assert stats.has_reap and stats.meta["family"] == "qwen3_moe"


# ---- bad input ------------------------------------------------------------------------------------
def _packager(*args, cwd=None):
    exe = Path(sys.executable).with_name("packager")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], block_count: int = 1) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(block_count)
    writer.add_uint32(f"{arch}.expert_used_count", 2)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_models_give_one_error_line_and_write_nothing(work, tmp_path):
    _, gguf_file = family_model("qwen3_moe", work)
    data = write_data(tmp_path / "d.jsonl")
    truncated = tmp_path / "truncated.gguf"
    raw = gguf_file.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(64))
    weight = np.zeros((8, 32), dtype=np.float32)
    dense = _write_gguf(tmp_path / "dense.gguf", "llama", {"token_embd.weight": weight, "blk.0.ffn_up.weight": weight})
    unknown = _write_gguf(tmp_path / "unknown.gguf", "jamba", {"token_embd.weight": weight, "blk.0.ffn_gate_inp.weight": weight})
    cases = [
        (truncated, "truncated"),
        (corrupt, "corrupt or truncated GGUF"),
        (dense, "not a mixture-of-experts model"),
        (unknown, "GGUF architecture 'jamba' is not one this packager"),
    ]
    for model, message in cases:
        out = tmp_path / f"{model.stem}.st"
        result = _packager("calibrate", model, "--data", data, "--pairs", "en-de", "--teacher-forced", "--out", out)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and message in lines[0] and str(model.name) in lines[0], lines[0]
        assert not out.exists() and not list(tmp_path.glob(f"{model.stem}.st*"))


def test_a_language_the_tokenizer_cannot_encode_is_refused(tmp_path):
    """A byte-level BPE trained on ASCII text only has no bytes for Japanese: llama.cpp would
    silently drop them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tiny_models import SPECIAL_TOKENS, WORDS

    model_dir = build_model("qwen3_moe", tmp_path / "ascii")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=SPECIAL_TOKENS + ["<|ja|>"], show_progress=False)
    tokenizer.train_from_iterator([" ".join(WORDS) + "\n"] * 4, trainer)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "chat_template.jinja").write_text("<|bos|><|{{ source_lang }}|><|{{ target_lang }}|>{{ messages[0]['content'] }}<|sep|>")
    gguf_file = export_gguf(model_dir, tmp_path / "ascii.gguf", dtype="f32")
    data = tmp_path / "ja.jsonl"
    data.write_text(json.dumps({"src_lang": "en", "tgt_lang": "ja", "src": "the house", "tgt": "ファイルを開く"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"cannot encode ja-en text 'ファイルを開く'"):
        calibrate_gguf(gguf_file, [data], CalibrationSettings(pairs=("ja-en",), teacher_forced=True), n_threads=1)
    with pytest.raises(CalibrationError, match=r"cannot encode en-ja text 'ファイルを開く'"):
        calibrate_gguf(gguf_file, [data], CalibrationSettings(pairs=("en-ja",), teacher_forced=True), n_threads=1)
    out = tmp_path / "ja.st"
    result = _packager("calibrate", gguf_file, "--data", data, "--pairs", "ja-en", "--out", out)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "cannot encode ja-en text" in lines[0], result.stderr
    assert not out.exists()


def test_stats_without_reap_refuse_the_reap_ranker(work, tmp_path):
    _, gguf_file = family_model("qwen3_moe", work)
    data = write_data(tmp_path / "d.jsonl")
    stats = calibrate_gguf(gguf_file, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True, reap=False), n_threads=1)
    assert not stats.has_reap and not any(name.startswith("reap") for name in stats.tensors)
    stats.save(tmp_path / "s.st")
    result = _packager("plan", "create", tmp_path / "s.st", "--langs", "de", "--drop", "0.5", "--ranker", "reap",
                       "--out", tmp_path / "p.json")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "has no REAP sums" in lines[0], result.stderr
    assert not (tmp_path / "p.json").exists()


def test_a_pruned_gguf_has_its_own_identity_and_a_missing_file_is_named(work, tmp_path):
    """Statistics carry the fingerprint computed from the GGUF's F32 routers: the parent's
    equals the safetensors fingerprint, a pruned child's differs (plans check it)."""
    from converters.gguf.gguf_file import gguf_fingerprint, open_gguf
    from converters.gguf.prune_gguf import prune_gguf
    from packager.core.fingerprint import model_fingerprint
    from packager.core.plan_file import Plan

    model_dir, gguf_file = family_model("qwen3_moe", work)
    parent_fingerprint = gguf_fingerprint(open_gguf(gguf_file), gguf_file)
    assert parent_fingerprint == model_fingerprint(model_dir)
    plan = Plan(model_fingerprint=parent_fingerprint, keep={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, meta={}).save(tmp_path / "plan.json")
    pruned = prune_gguf(gguf_file, plan, tmp_path / "pruned.gguf")
    data = write_data(tmp_path / "d.jsonl")
    settings = CalibrationSettings(pairs=("en-de",), teacher_forced=True)
    stats = calibrate_gguf(pruned, [data], settings, n_threads=1)
    assert stats.n_experts == 4 and stats.meta["model_fingerprint"] not in (parent_fingerprint, None)
    with pytest.raises(PackagerError, match=r"missing.gguf: GGUF file not found"):
        calibrate_gguf(tmp_path / "missing.gguf", [data], settings)
    with pytest.raises(CalibrationError, match=r"--execution streamed apply to Hugging Face models only"):
        calibrate_gguf(pruned, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True, execution="streamed"))
