"""`packager fit` on synthetic bundle manifests (issue 19, part 3)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from packager.fit import PROFILES, FitError, describe, fit, load_candidates, parse_size

MB = 1000**2


def _manifest(directions: dict[str, float], ram: int, storage: int, fmt: str = "gguf", quant: str = "F16") -> dict:
    model = "model.gguf" if fmt == "gguf" else "model.onnx"
    return {
        "schema_version": 1, "kind": "bundle_manifest", "format": fmt, "model_files": [model], "family": "qwen3_moe",
        "prompt_template": "{{ messages[0]['content'] }}", "stop_tokens": ["<|eos|>"], "top_k": 2, "n_experts": {"0": 4},
        "quantization": {"type": quant}, "provenance": {},
        "metrics": {"directions": {d.replace("->", "-"): {"chrf++": c} for d, c in directions.items()}},
        "files": {model: {"sha256": "0" * 64, "bytes": storage}},
        "min_ram_bytes": ram, "directions": list(directions),
    }


def _write(root: Path, name: str, manifest: dict) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "manifest.json").write_text(json.dumps(manifest))
    return root / name


@pytest.fixture
def bundles(tmp_path) -> Path:
    root = tmp_path / "bundles"
    _write(root, "big-f16", _manifest({"en->de": 60.0, "de->en": 62.0}, ram=1800 * MB, storage=900 * MB))
    _write(root, "half-q8", _manifest({"en->de": 58.5, "de->en": 61.0}, ram=700 * MB, storage=300 * MB, quant="Q8_0"))
    _write(root, "half-q4", _manifest({"en->de": 55.0}, ram=450 * MB, storage=180 * MB, quant="Q4_K_M"))
    _write(root, "fr-only", _manifest({"en->fr": 50.0}, ram=400 * MB, storage=150 * MB))
    return root


def test_parse_size():
    assert parse_size("2GB") == 2 * 1000**3
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("500MB") == 500 * MB
    assert parse_size("300M") == 300 * MB
    assert parse_size("1234") == 1234
    with pytest.raises(FitError, match="expected a size"):
        parse_size("lots")


def test_fit_picks_the_best_that_fits(bundles):
    results = fit(load_candidates(bundles), None, 1000 * MB, 500 * MB)
    assert list(results) == ["de->en", "en->de", "en->fr"]
    best = {d: next(v.candidate.name for v in verdicts if v.fits) for d, verdicts in results.items()}
    assert best == {"en->de": "half-q8", "de->en": "half-q8", "en->fr": "fr-only"}
    big = next(v for v in results["en->de"] if v.candidate.name == "big-f16")
    assert not big.fits and len(big.reasons) == 2  # RAM and storage
    lines, ok = describe(results, 1000 * MB, 500 * MB)
    assert ok
    text = "\n".join(lines)
    assert "en->de: half-q8  chrF++ 58.50" in text
    assert "big-f16: needs 1.80 GB RAM (measured) > 1.00 GB; 900.0 MB of files > 500.0 MB storage" in text
    assert "half-q4: fits, lower chrF++ (55.00)" in text


def test_fit_with_room_takes_the_highest_chrf(bundles):
    results = fit(load_candidates(bundles), ["en->de"], 4000 * MB, 4000 * MB)
    assert [v.candidate.name for v in results["en->de"]] == ["big-f16", "half-q8", "half-q4"]
    assert all(v.fits for v in results["en->de"])


def test_fit_ties_go_to_less_ram_then_fewer_bytes_then_name(tmp_path):
    root = tmp_path / "b"
    _write(root, "a-more-ram", _manifest({"en->de": 58.0}, ram=800 * MB, storage=100 * MB))
    _write(root, "b-less-ram", _manifest({"en->de": 58.0}, ram=600 * MB, storage=300 * MB))
    _write(root, "c-same-ram-fewer-bytes", _manifest({"en->de": 58.0}, ram=600 * MB, storage=200 * MB))
    _write(root, "d-same", _manifest({"en->de": 58.0}, ram=600 * MB, storage=200 * MB))
    _write(root, "e-unmeasured", _manifest({}, ram=600 * MB, storage=10 * MB) | {"directions": ["en->de"]})
    results = fit(load_candidates(root), ["en->de"], 1000 * MB, None)
    assert [v.candidate.name for v in results["en->de"]] == [
        "c-same-ram-fewer-bytes", "d-same", "b-less-ram", "a-more-ram", "e-unmeasured"]
    text = "\n".join(describe(results, 1000 * MB, None)[0])
    assert "d-same: fits, same chrF++ 58.00: the tie goes to less RAM, then fewer bytes, then the name" in text


def test_fit_nothing_fits_exits_nonzero(bundles):
    from packager.cli import cli

    result = CliRunner().invoke(cli, ["fit", "--bundles", str(bundles), "--ram", "300MB", "--storage", "1GB",
                                      "--directions", "en->de"], standalone_mode=False)
    assert result.return_value == 1
    assert "en->de: nothing fits (3 bundle(s) offer it)" in result.output
    assert "half-q4: needs 450.0 MB RAM (measured) > 300.0 MB" in result.output
    assert "no bundle fits for en->de" in result.output  # stderr is mixed in by CliRunner


def test_fit_direction_nobody_offers(bundles):
    results = fit(load_candidates(bundles), ["ja->en"], 1000 * MB, None)
    lines, ok = describe(results, 1000 * MB, None)
    assert not ok and "ja->en: no bundle offers this direction" in lines


def test_fit_profile_and_cli_success(bundles):
    from packager.cli import cli

    result = CliRunner().invoke(cli, ["fit", "--bundles", str(bundles), "--profile", "phone-3gb"], standalone_mode=False)
    assert result.exception is None and result.return_value == 0, result.output
    assert result.output.startswith("profile phone-3gb:")
    assert "en->de: half-q8" in result.output  # 1 GiB RAM, 500 MB storage
    listed = CliRunner().invoke(cli, ["fit", "--bundles", str(bundles), "--list-profiles"], standalone_mode=False)
    assert all(name in listed.output for name in PROFILES)
    bad = CliRunner().invoke(cli, ["fit", "--bundles", str(bundles), "--profile", "toaster"], standalone_mode=False)
    assert isinstance(bad.exception, FitError) and "known: pi4-2gb" in str(bad.exception)


def test_fit_reads_archives_and_reports(tmp_path, bundles):
    archive = tmp_path / "half-q8.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundles / "half-q8", arcname="half-q8")
    [candidate] = load_candidates(archive)
    assert candidate.name == "half-q8.tar" and candidate.ram_bytes == 700 * MB
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"packs": {"en<->de": {"rows": [
        {"name": "q4", "format": "gguf", "quantization": "Q4_K_M", "file_bytes": 180 * MB, "peak_rss_bytes": 400 * MB,
         "directions": {"en-de": {"chrf++": 55.0}}, "metrics_file": "runs/q4/metrics.json"},
        {"name": "mask", "format": "hf", "file_bytes": 900 * MB, "peak_rss_bytes": None,
         "directions": {"en-de": {"chrf++": 60.0}}}]}}}))
    results = fit(load_candidates(report), ["en->de"], 500 * MB, None)
    assert [(v.candidate.name, v.fits) for v in results["en->de"]] == [("en<->de/mask", False), ("en<->de/q4", True)]
    assert "RAM need unknown" in results["en->de"][0].reasons[0]


def test_fit_errors(tmp_path):
    with pytest.raises(FitError, match="not found"):
        load_candidates(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FitError, match="holds no bundle"):
        load_candidates(tmp_path / "empty")


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "models" / "default" / "config.json").is_file(),
                    reason="models/default is not trained")
def test_gguf_dry_run_breakdown_matches_the_metadata(tmp_path):
    """llama.cpp's dry run (no_alloc) gives the weights' size and the KV cache the formula gives;
    the estimate is the runtime constant + weights + KV + output + the dry run's own growth
    (the reserved compute buffer is left out), which is a few MiB here, not a model's worth."""
    from converters.gguf.export import export_gguf
    from packager.fit import MIB, RAM_MARGIN, RUNTIME_BYTES, _gguf_formula, estimate_ram_bytes, gguf_memory_breakdown

    gguf = export_gguf(Path(__file__).resolve().parents[1] / "models" / "default", tmp_path / "d.gguf", dtype="f16")
    dry, formula = gguf_memory_breakdown(gguf), _gguf_formula(gguf)
    assert dry is not None and dry["model"] == formula["model"] and dry["kv"] == formula["kv"]
    assert 0.8 < dry["compute"] / formula["compute"] < 1.2
    assert 1 * MIB < dry["load_rss"] < 32 * MIB
    expected = (RUNTIME_BYTES["gguf"] + dry["model"] + dry["kv"] + dry["output"] + dry["load_rss"]) * RAM_MARGIN
    # load_rss is an RSS reading of a second dry run: equal to within a few pages
    assert estimate_ram_bytes(gguf, "gguf", 0) == pytest.approx(expected, abs=1 * MIB)
    assert gguf_memory_breakdown(tmp_path / "missing.gguf") is None


def test_onnx_estimate_without_a_loadable_model_falls_back_to_twice_the_files(tmp_path):
    from packager.fit import RAM_MARGIN, RUNTIME_BYTES, estimate_ram_bytes, onnx_session_bytes

    (tmp_path / "model.onnx").write_bytes(b"not an onnx graph")
    assert onnx_session_bytes(tmp_path / "model.onnx") is None
    assert estimate_ram_bytes(tmp_path / "model.onnx", "onnx", 1000) == int((RUNTIME_BYTES["onnx"] + 2000) * RAM_MARGIN)
    assert estimate_ram_bytes(tmp_path / "gone" / "model.onnx", "onnx", 1000) == int((RUNTIME_BYTES["onnx"] + 2000) * RAM_MARGIN)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "models" / "default" / "config.json").is_file(),
                    reason="models/default is not trained")
def test_onnx_estimate_is_the_session_rss_plus_the_runtime_constant(tmp_path):
    """The ONNX dry run loads the model in a child (weights read, nothing run): the session holds
    at least the weights, and the estimate is that plus RUNTIME_BYTES and the margin."""
    from converters.onnx.export import export_onnx
    from packager.fit import MIB, RAM_MARGIN, RUNTIME_BYTES, estimate_ram_bytes, onnx_session_bytes

    model = export_onnx(Path(__file__).resolve().parents[1] / "models" / "default", tmp_path / "onnx") / "model.onnx"
    weights = sum(p.stat().st_size for p in model.parent.iterdir() if p.is_file())
    session = onnx_session_bytes(model)
    assert session is not None and weights < session < weights + 256 * MIB
    # a second child's RSS reading: equal to within a few MiB
    assert estimate_ram_bytes(model, "onnx", weights) == pytest.approx((RUNTIME_BYTES["onnx"] + session) * RAM_MARGIN,
                                                                       abs=4 * MIB)
