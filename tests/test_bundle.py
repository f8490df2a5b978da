"""verify (fresh-process measurement), bundle (manifest, sha256, atomic), runtime.bundle
(tamper detection, directions, archives) and `edge-translate` on bundles, on a tiny GGUF."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from converters.gguf.export import export_gguf
from packager.bundle import BundleBuildError, make_bundle, min_ram_bytes
from packager.core.errors import OutputExistsError
from packager.verify import VerifyError, load_metrics, segments_file, verify
from runtime.backends import open_backend
from runtime.bundle import BundleError, DirectionError, load_bundle
from runtime.errors import SchemaError
from tiny_models import WORDS, build_tiny, byte_bpe

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TEMPLATE = "<|bos|><|{{ source_lang }}|><|{{ target_lang }}|>{{ messages[0]['content'] }}<|sep|>"
# Sentences written for these tests (not harvested): harvest record format.
PAIRS = {
    "de": [("Open the file", "Datei öffnen"), ("Save the document", "Dokument speichern"),
           ("Close the window", "Fenster schließen"), ("The file %s was not found", "Die Datei %s wurde nicht gefunden")],
    "fr": [("Open the file", "Ouvrir le fichier"), ("Save the document", "Enregistrer le document"),
           ("Close the window", "Fermer la fenêtre")],
}


def write_bpe_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE (what the GGUF exporter accepts) trained on a few words and pairs."""
    corpus = [" ".join(WORDS)] * 5 + [text for rows in PAIRS.values() for pair in rows for text in pair] * 5
    byte_bpe(corpus, vocab_size).save(str(model_dir / "tokenizer.json"))
    (model_dir / "chat_template.jinja").write_text(TEMPLATE)


def build_translator(out_dir: Path, vocab_size: int = 320, **overrides) -> Path:
    build_tiny("qwen3_moe", out_dir, vocab_size=vocab_size, max_position_embeddings=256, **overrides)
    write_bpe_tokenizer(out_dir, vocab_size)
    return out_dir


def write_test_data(path: Path) -> Path:
    lines = [json.dumps({"src_lang": "en", "tgt_lang": lang, "src": src, "tgt": tgt, "package": f"tests-{lang}",
                         "version": "1", "license": "CC0-1.0", "split": "test"}, ensure_ascii=False)
             for lang, rows in PAIRS.items() for src, tgt in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(*args: str, stdin: str | None = None, cache_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cache_dir is not None:  # where edge-translate unpacks .tar bundles
        env["XDG_CACHE_HOME"] = str(cache_dir)
    return subprocess.run(list(args), input=stdin, capture_output=True, text=True, env=env, timeout=120)


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundle")


@pytest.fixture(scope="module")
def gguf_file(work) -> Path:
    model_dir = build_translator(work / "model")
    (work / "export").mkdir()
    return export_gguf(model_dir, work / "export" / "tiny.gguf", dtype="f32")


@pytest.fixture(scope="module")
def test_data(work) -> Path:
    return write_test_data(work / "test.jsonl")


@pytest.fixture(scope="module")
def metrics_path(work, gguf_file, test_data) -> Path:
    verify(gguf_file, test_data, "en-de,en->fr", work / "metrics.json", parent=gguf_file, threads=1,
           n_bootstrap=0, progress=False, labels={"pack": "tests"})
    return work / "metrics.json"


@pytest.fixture(scope="module")
def bundle_dir(work, gguf_file, metrics_path, test_data) -> Path:
    return make_bundle(gguf_file, metrics_path, work / "bundle", calibration_data=[test_data], archive=True)


# ------------------------------------------------------------------------------- verify
def test_verify_records_quality_errors_and_footprint(metrics_path, gguf_file, test_data):
    metrics = load_metrics(metrics_path)
    assert metrics["labels"] == {"pack": "tests"}
    assert list(metrics["directions"]) == ["en-de", "en-fr"]
    assert metrics["test"]["n"] == {"en-de": 4, "en-fr": 3}
    assert metrics["test"]["sha256"] == hashlib.sha256(test_data.read_bytes()).hexdigest()
    assert metrics["test"]["licenses"] == [
        {"package": "tests-de", "license": "CC0-1.0", "segments": 4, "use": "evaluation"},
        {"package": "tests-fr", "license": "CC0-1.0", "segments": 3, "use": "evaluation"},
    ]
    de = metrics["directions"]["en-de"]
    assert de["n"] == 4 and de["skipped_too_long"] == 0
    assert de["chrf_signature"] == "nrefs:1|case:mixed|eff:yes|nc:6|nw:2|space:no|version:2.6.0"
    assert "tok:13a" in de["bleu_signature"]
    assert set(de["errors"]) == {"empty", "repetition", "length_ratio", "wrong_script", "wrong_language", "lost_placeholder"}
    assert de["reference_error_rate"] == 0.0
    rows = [json.loads(line) for line in segments_file(metrics_path).read_text(encoding="utf-8").splitlines()]
    assert [r["src"] for r in rows] == [s for s, _ in PAIRS["de"]] + [s for s, _ in PAIRS["fr"]]
    # the error rate is what the per-segment rows say
    assert de["error_rate"] == round(sum(1 for r in rows[:4] if r["errors"]) / 4, 4)

    f = metrics["footprint"]
    assert f["file_bytes"] == gguf_file.stat().st_size == metrics["model"]["files"]["tiny.gguf"]["bytes"]
    assert f["threads"] == 1
    assert f["baseline_rss_bytes"] > 10 * 2**20  # the interpreter and llama.cpp are loaded
    assert f["peak_rss_bytes"] >= f["after_load_rss_bytes"] >= f["baseline_rss_bytes"]
    assert f["peak_rss_above_baseline_bytes"] == f["peak_rss_bytes"] - f["baseline_rss_bytes"]
    assert f["peak_rss_anon_bytes"] >= f["baseline_rss_anon_bytes"] > 0
    assert f["prefill_tokens"] > 0 and f["prefill_tokens_per_second"] > 0 and f["load_seconds"] > 0


def test_verify_parent_ratios_of_the_same_model(metrics_path):
    """Greedy decoding is deterministic: the parent measured the same way scores the same."""
    metrics = load_metrics(metrics_path)
    ratios = metrics["ratios"]
    assert ratios["file_bytes"] == 1.0
    assert ratios["chrf++_delta"] == 0.0 and ratios["error_rate_delta"] == 0.0
    assert ratios["same_format_and_quantization"] is True
    assert metrics["parent"]["directions"]["en-de"]["chrf++"] == metrics["directions"]["en-de"]["chrf++"]
    assert 0.5 < ratios["peak_rss_bytes"] < 2.0


def test_verify_reuses_parent_metrics_only_for_the_same_selection(work, gguf_file, test_data, metrics_path):
    record = verify(gguf_file, test_data, "en-de", work / "m-reuse.json", parent_metrics=metrics_path, threads=1,
                    n_bootstrap=0, progress=False)
    assert record["ratios"]["directions"]["en-de"]["chrf++_delta"] == 0.0
    with pytest.raises(VerifyError, match="another selection"):
        verify(gguf_file, test_data, "en-de", work / "m-bad.json", parent_metrics=metrics_path, limit=2, threads=1,
               n_bootstrap=0, progress=False)
    assert not (work / "m-bad.json").exists()


def test_verify_bad_inputs_one_error_line(work, gguf_file, test_data):
    packager = str(VENV_BIN / "packager")
    missing = run_cli(packager, "verify", str(gguf_file), "--test", str(work / "nope.jsonl"), "--pairs", "en-de",
                      "--out", str(work / "m-missing.json"))
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"error: {work / 'nope.jsonl'}: test file not found; give a harvest JSONL (e.g. data/harvest/test.jsonl, made by `make data-eval`)"]
    unknown = run_cli(packager, "verify", str(gguf_file), "--test", str(test_data), "--pairs", "en-ja",
                      "--out", str(work / "m-unknown.json"))
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines() == [
        f"error: {test_data}: no test records for en->ja (the file has de->en, en->de, en->fr, fr->en); choose --pairs among these"]
    assert not (work / "m-missing.json").exists() and not (work / "m-unknown.json").exists()
    bad_line = work / "bad.jsonl"
    bad_line.write_text('{"src_lang": "en", "tgt_lang": "de", "src": "a", "tgt": "b"}\nnot json\n')
    with pytest.raises(VerifyError, match=r"bad.jsonl:2: not valid JSON"):
        verify(gguf_file, bad_line, "en-de", work / "m.json", progress=False)


# ------------------------------------------------------------------------------- bundle
def test_bundle_layout_and_manifest(bundle_dir, gguf_file, metrics_path):
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["manifest.json", "manifest.sha256", "tiny.gguf"]
    raw = (bundle_dir / "manifest.json").read_bytes()
    assert (bundle_dir / "manifest.sha256").read_text() == f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n"
    manifest = json.loads(raw)
    assert manifest["kind"] == "bundle_manifest" and manifest["format"] == "gguf"
    assert manifest["directions"] == ["en->de", "en->fr"]
    assert manifest["languages"] == ["en", "de", "fr"]
    assert manifest["model_files"] == ["tiny.gguf"]
    assert manifest["files"] == {"tiny.gguf": {"sha256": hashlib.sha256(gguf_file.read_bytes()).hexdigest(),
                                               "bytes": gguf_file.stat().st_size}}
    metrics = load_metrics(metrics_path)
    peak = metrics["footprint"]["peak_rss_bytes"]
    assert manifest["min_ram_bytes"] == math.ceil(peak * 1.1 / 2**20) * 2**20 == min_ram_bytes(metrics)
    assert manifest["metrics"]["summary"] == metrics["summary"]
    assert manifest["metrics"]["test"]["n"] == {"en-de": 4, "en-fr": 3}
    assert manifest["quantization"] == {"type": "F32"}
    assert manifest["parent_fingerprint"] is not None and len(manifest["parent_fingerprint"]) == 64
    assert manifest["provenance"]["bundle"]["packager_version"] == "0.1.0"
    uses = sorted({(item["use"], item["package"], item["license"]) for item in manifest["licenses"]})
    assert uses == [("calibration", "tests-de", "CC0-1.0"), ("calibration", "tests-fr", "CC0-1.0"),
                    ("evaluation", "tests-de", "CC0-1.0"), ("evaluation", "tests-fr", "CC0-1.0")]
    assert oct((bundle_dir / "tiny.gguf").stat().st_mode & 0o777) == "0o644"


def test_bundle_translates_like_the_export(bundle_dir, gguf_file):
    bundle = load_bundle(bundle_dir)
    with bundle.open(n_threads=1) as backend:
        ours = backend.translate("Open the file", "en", "de", max_new_tokens=12)
    with open_backend(gguf_file, n_threads=1) as backend:
        assert backend.translate("Open the file", "en", "de", max_new_tokens=12) == ours
    # the archive holds the same bundle
    archived = load_bundle(bundle_dir.with_name("bundle.tar"), cache_dir=bundle_dir.parent / "cache")
    assert archived.manifest.to_dict() == bundle.manifest.to_dict()
    assert archived.root.name == "bundle" and archived.root.parent.parent == bundle_dir.parent / "cache"


def test_edge_translate_bundle_arguments_stdin_file(bundle_dir, work):
    with load_bundle(bundle_dir).open(n_threads=1) as backend:
        expected = [backend.translate(text, "en", "fr", max_new_tokens=6) for text in ("Open the file", "Close the window")]
    exe = str(VENV_BIN / "edge-translate")
    common = ["--from", "en", "--to", "fr", "--max-new-tokens", "6", "--threads", "1"]
    argument = run_cli(exe, str(bundle_dir), "Open the file", *common)
    assert argument.returncode == 0, argument.stderr
    assert argument.stdout == expected[0] + "\n"
    piped = run_cli(exe, str(bundle_dir), *common, stdin="Open the file\n\nClose the window\n")
    assert piped.stdout == f"{expected[0]}\n\n{expected[1]}\n"
    source = work / "lines.txt"
    source.write_text("Open the file\nClose the window\n", encoding="utf-8")
    from_file = run_cli(exe, str(bundle_dir.with_name("bundle.tar")), "--file", str(source), *common, cache_dir=work / "xdg")
    assert from_file.stdout == f"{expected[0]}\n{expected[1]}\n"
    unpacked = list((work / "xdg" / "edge-translate").iterdir())
    assert len(unpacked) == 1 and (unpacked[0] / "bundle" / "manifest.json").is_file()


def test_verify_accepts_a_bundle_and_checks_it(bundle_dir, work, test_data):
    record = verify(bundle_dir, test_data, "en-de", work / "m-bundle.json", threads=1, n_bootstrap=0, progress=False)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert record["model"]["files"]["tiny.gguf"] == manifest["files"]["tiny.gguf"]
    with pytest.raises(VerifyError, match="this bundle translates en->de, en->fr, not de->en"):
        verify(bundle_dir, test_data, "de-en", work / "m-bundle2.json", progress=False)
    assert not (work / "m-bundle2.json").exists()


def test_edge_translate_refuses_uncovered_direction(bundle_dir):
    result = run_cli(str(VENV_BIN / "edge-translate"), str(bundle_dir), "Open", "--from", "de", "--to", "en")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {bundle_dir}: this bundle translates en->de, en->fr, not de->en; use a bundle built for de->en "
        f"(packager build) or one of the directions listed"]
    with pytest.raises(DirectionError, match="translates en->de, en->fr, not en->es"):
        load_bundle(bundle_dir).check_direction("en", "es-ES")


# ------------------------------------------------------------------------------- tampering
def _copy(bundle_dir: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle_dir, dst))


def test_tampered_model_file_is_refused(bundle_dir, work):
    copy = _copy(bundle_dir, work / "tampered-model")
    with (copy / "tiny.gguf").open("r+b") as handle:
        handle.seek(4096)
        byte = handle.read(1)
        handle.seek(4096)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"tiny.gguf: sha256 does not match the manifest"):
        load_bundle(copy)
    result = run_cli(str(VENV_BIN / "edge-translate"), str(copy), "Open", "--from", "en", "--to", "de")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {copy / 'tiny.gguf'}: sha256 does not match the manifest; the file was "
                                          f"modified or corrupted, rebuild or re-copy the bundle"]


def test_tampered_manifest_is_refused(bundle_dir, work):
    copy = _copy(bundle_dir, work / "tampered-manifest")
    text = (copy / "manifest.json").read_text().replace('"en->fr"', '"en->es"')
    (copy / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="manifest.json: does not match manifest.sha256"):
        load_bundle(copy)


def test_truncated_missing_and_corrupt_bundles(bundle_dir, work):
    truncated = _copy(bundle_dir, work / "truncated")
    size = (truncated / "tiny.gguf").stat().st_size
    os.truncate(truncated / "tiny.gguf", size - 10)
    with pytest.raises(BundleError, match=rf"{size - 10} bytes, the manifest says {size}"):
        load_bundle(truncated)
    missing = _copy(bundle_dir, work / "missing")
    (missing / "tiny.gguf").unlink()
    with pytest.raises(BundleError, match="missing from the bundle"):
        load_bundle(missing)
    no_digest = _copy(bundle_dir, work / "no-digest")
    (no_digest / "manifest.sha256").unlink()
    with pytest.raises(BundleError, match="manifest.sha256: missing or unreadable"):
        load_bundle(no_digest)
    # a manifest that is consistent with its digest but breaks the schema
    broken = _copy(bundle_dir, work / "broken-schema")
    data = json.loads((broken / "manifest.json").read_text())
    data["top_k"] = 0
    raw = json.dumps(data).encode()
    (broken / "manifest.json").write_bytes(raw)
    (broken / "manifest.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")
    with pytest.raises(SchemaError, match="field 'top_k' must be >= 1"):
        load_bundle(broken)
    garbage = work / "garbage.tar"
    garbage.write_bytes(b"not a tar at all")
    with pytest.raises(BundleError, match="not a tar archive, or truncated"):
        load_bundle(garbage, cache_dir=work / "cache2")
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(work)


# ------------------------------------------------------------------------------- atomic, no partial bundle
def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_no_partial_bundle_on_errors(work, gguf_file, metrics_path, test_data, monkeypatch):
    out_root = work / "outs"
    out_root.mkdir()
    # metrics of another model
    other = json.loads(metrics_path.read_text())
    other["model"]["files"]["tiny.gguf"]["bytes"] += 1
    (work / "other-metrics.json").write_text(json.dumps(other))
    with pytest.raises(BundleBuildError, match="was measured on another tiny.gguf"):
        make_bundle(gguf_file, work / "other-metrics.json", out_root / "b")
    # a direction that was not verified
    with pytest.raises(BundleBuildError, match=r"direction\(s\) en->es were not verified"):
        make_bundle(gguf_file, metrics_path, out_root / "b", directions="en->de,es")
    # not a metrics file
    with pytest.raises(VerifyError, match="not a `packager verify` metrics file"):
        make_bundle(gguf_file, gguf_file.with_name("tiny.export.json"), out_root / "b")
    with pytest.raises(VerifyError, match="not a readable metrics JSON"):
        make_bundle(gguf_file, test_data, out_root / "b")
    # a failure in the middle of copying
    import packager.bundle as bundle_module

    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "_copy_hashed", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        make_bundle(gguf_file, metrics_path, out_root / "b", archive=True)
    monkeypatch.undo()
    assert list(out_root.iterdir()) == []
    assert _leftovers(work) == []


def test_existing_bundle_needs_force(work, gguf_file, metrics_path):
    out = work / "forced"
    make_bundle(gguf_file, metrics_path, out, directions=["en-de"])
    with pytest.raises(OutputExistsError, match="already exists"):
        make_bundle(gguf_file, metrics_path, out)
    make_bundle(gguf_file, metrics_path, out, force=True)
    assert load_bundle(out).manifest.directions == ["en->de", "en->fr"]
    assert _leftovers(work) == []


# ------------------------------------------------------------------------------- runtime without torch
BLOCKED = "import sys\nfor name in ('torch', 'transformers', 'safetensors', 'sacrebleu', 'lingua', 'matplotlib'):\n    sys.modules[name] = None\n"


def test_runtime_and_verify_worker_run_without_torch(bundle_dir, work):
    job = work / "job.json"
    job.write_text(json.dumps({"model": str(bundle_dir), "threads": 1, "max_new_tokens": 4,
                               "segments": [{"src": "Open the file", "src_lang": "en", "tgt_lang": "de"}]}))
    code = BLOCKED + (
        "import runtime.bundle, runtime.cli, runtime.backends.llama_cpp_backend\n"
        f"bundle = runtime.bundle.load_bundle({str(bundle_dir)!r})\n"
        "with bundle.open(n_threads=1) as backend:\n"
        "    backend.translate('Open the file', 'en', 'de', max_new_tokens=4)\n"
        "import packager.verify\n"
        f"assert packager.verify._worker({str(job)!r}, {str(work / 'job-out.json')!r}) == 0\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "ok"
    out = json.loads((work / "job-out.json").read_text())
    assert len(out["results"]) == 1 and out["results"][0]["new_tokens"] <= 4
