"""`packager build` on a GGUF parent (issue 14): calibrate in llama.cpp -> plan -> prune-gguf ->
quantize -> verify -> bundle -> report with torch and transformers blocked from import in the
build and in every process it starts; ONNX and distillation are refused for a GGUF parent with
one error line; a torch-free install names what to install in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from converters.gguf.export import export_gguf
from converters.gguf.quantize import quantize_gguf
from packager.build import BuildError, load_build_config
from packager.core.fingerprint import model_fingerprint
from runtime.backends import export_config_path
from runtime.bundle import load_bundle
import packs_file
from test_bundle import build_translator, write_test_data

# Imported by every Python process started with this directory on PYTHONPATH (site imports
# sitecustomize): torch and transformers behave as if they were not installed.
SITECUSTOMIZE = textwrap.dedent("""
    import sys

    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Blocked())
""")

VARIANT = """
[[variant]]
format = "gguf"
quant = ["F16", "Q8_0"]
"""


def packs_toml(parent: str = "parent.gguf", variants: str = VARIANT, extra: str = "") -> str:
    return packs_file.packs_toml(parent, variants, extra=extra)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """An F16 GGUF parent as a user holds it: no Hugging Face weights beside it, no export config."""
    work = tmp_path_factory.mktemp("build_gguf")
    build_translator(work / "hf", num_hidden_layers=3)
    gguf_file = export_gguf(work / "hf", work / "parent.gguf", dtype="f16")
    export_config_path(gguf_file).unlink()
    write_test_data(work / "data.jsonl")
    (work / "packs.toml").write_text(packs_toml(extra='profiles = ["laptop-8gb", "phone-3gb"]'))
    (work / "blocker").mkdir()
    (work / "blocker" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return work


def torch_free(work: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`packager ARGS` in a process (and its children) where torch and transformers cannot be imported."""
    script = textwrap.dedent("""
        import sys
        from packager.cli import main
        try:
            sys.argv = ["packager"] + sys.argv[1:]
            main()
        finally:
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
            print("imported torch/transformers:", loaded or "none", file=sys.stderr)
    """)
    path = os.pathsep.join([str(work / "blocker"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or work, timeout=600)


def test_gguf_parent_builds_bundles_without_torch(work):
    started = time.monotonic()
    result = torch_free(work, "build", "packs.toml", "--out", "run")
    seconds = time.monotonic() - started
    print(f"torch-free GGUF build: {seconds:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported torch/transformers: none" in result.stderr
    record = json.loads((work / "run" / "build.json").read_text())
    statuses = {step["id"]: step["status"] for step in record["steps"]}
    assert list(statuses) == [
        "calibrate/en-de", "calibrate/en-fr", "calibrate", "parent/gguf/quantize", "parent/gguf/F16/verify", "parent/gguf/Q8_0/verify",
        "en-de-fr/d50-uniform-routing-mass/plan", "en-de-fr/d50-uniform-routing-mass/prune",
        "en-de-fr/d50-uniform-routing-mass/gguf/quantize", "en-de-fr/d50-uniform-routing-mass/gguf/F16/verify",
        "bundle/en-de-fr-gguf-F16-d50-uniform", "en-de-fr/d50-uniform-routing-mass/gguf/Q8_0/verify",
        "bundle/en-de-fr-gguf-Q8_0-d50-uniform", "report",
    ]
    assert set(statuses.values()) == {"done"}
    stats_meta = json.loads(subprocess.run(
        [sys.executable, "-c", "import json,sys; from packager.core.stats import RoutingStats; "
                               "print(json.dumps(RoutingStats.load(sys.argv[1]).meta['provenance'][0]['execution']))",
         str(work / "run" / "calibration" / "stats.safetensors")], capture_output=True, text=True, check=True).stdout)
    assert stats_meta["mode"] == "llama.cpp"

    parent_fp = model_fingerprint(work / "hf")  # the GGUF's routers give the safetensors fingerprint
    assert len(record["bundles"]) == 2
    for bundle_dir in map(Path, record["bundles"]):
        manifest = load_bundle(bundle_dir).manifest
        assert manifest.format == "gguf" and manifest.directions == ["en->de", "en->fr"]
        assert manifest.parent_fingerprint == parent_fp
        assert len(manifest.n_experts) == 3 and set(manifest.n_experts.values()) == {4}  # 8 experts, half dropped
        assert manifest.quantization["type"] in ("F16", "Q8_0")
        assert manifest.metrics["ratios"]["same_format_and_quantization"]  # parent measured in the same type
        assert manifest.metrics["ratios"]["file_bytes"] < 1.0
    report = json.loads((work / "run" / "report" / "report.json").read_text())
    rows = report["packs"]["en->de,fr"]["rows"]
    assert sorted((r["role"], r["quantization"]) for r in rows) == [
        ("parent", "F16"), ("parent", "Q8_0"), ("pruned", "F16"), ("pruned", "Q8_0")]
    assert not export_config_path(work / "parent.gguf").exists()  # nothing written beside the parent
    fitted = json.loads((work / "run" / "fit.json").read_text())  # profiles = [...]: packager fit per profile
    assert record["fit"] == str(work / "run" / "fit.json") and list(fitted) == ["laptop-8gb", "phone-3gb"]
    assert fitted["laptop-8gb"]["all_directions_fit"]
    assert set(fitted["laptop-8gb"]["best"]) == {"en->de", "en->fr"}
    assert fitted["laptop-8gb"]["best"]["en->de"] in record["bundles"]

    again = torch_free(work, "build", "packs.toml", "--out", "run", "--dry-run")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("up to date") == len(statuses) - 1  # all but the report


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("imported torch/transformers")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


ONNX_VARIANT = VARIANT + """
[[variant]]
format = "onnx"
quant = ["int8"]
"""


@pytest.mark.parametrize("variants, extra, message", [
    (ONNX_VARIANT, "", "[[variant]] #2: format = 'onnx' needs a Hugging Face parent, but parent = 'parent.gguf' is a GGUF"),
    (VARIANT, "distill = true", "distill: distillation needs a Hugging Face parent"),
    (VARIANT.replace('quant = ["F16", "Q8_0"]', 'distill = {minutes = 5}'), "",
     "[[variant]] #1 distill: distillation needs a Hugging Face parent"),
    (VARIANT, 'profiles = ["toaster"]', "profiles must be a list of device profiles (pi4-2gb, pi5-8gb"),
], ids=["onnx", "distill", "variant-distill", "profile"])
def test_onnx_and_distillation_are_refused_for_a_gguf_parent(work, tmp_path, variants, extra, message):
    packs = work / f"refused-{tmp_path.name}.toml"
    packs.write_text(packs_toml(variants=variants, extra=extra))
    with pytest.raises(BuildError) as caught:
        load_build_config(packs)
    assert str(caught.value).startswith(f"{packs}: ") and message in str(caught.value)
    line = _one_error_line(torch_free(work, "build", packs.name, "--out", str(tmp_path / "run")))
    assert str(packs) in line and message in line
    assert not (tmp_path / "run").exists()


def test_gguf_parent_quantization_choices(work, tmp_path):
    """quant defaults to the parent's own type; an unquantized parent may be quantized further, a
    quantized one is not re-quantized; a missing or dense parent is named."""
    config = load_build_config(_write(work, "default.toml", packs_toml(variants='[[variant]]\nformat = "gguf"\n')))
    assert config.gguf_parent and config.parent_gguf_type == "F16" and config.variants[0].quant == ("F16",)
    q8 = quantize_gguf(work / "parent.gguf", work / "parent.Q8_0.gguf", "Q8_0", n_threads=1)
    config = load_build_config(_write(work, "q8.toml", packs_toml(parent=q8.name, variants='[[variant]]\nformat = "gguf"\n')))
    assert config.parent_gguf_type == "Q8_0" and config.variants[0].quant == ("Q8_0",)
    with pytest.raises(BuildError, match=r"quant 'Q4_K_M': the GGUF parent is already Q8_0 and llama.cpp does not re-quantize"):
        load_build_config(_write(work, "requant.toml", packs_toml(parent=q8.name, variants=VARIANT.replace('"F16", "Q8_0"', '"Q4_K_M"'))))
    with pytest.raises(BuildError, match=r"unknown quantization type 'Q9'"):
        load_build_config(_write(work, "q9.toml", packs_toml(variants=VARIANT.replace('"Q8_0"', '"Q9"'))))
    with pytest.raises(BuildError, match=r"parent = 'missing.gguf': GGUF file .*missing.gguf not found"):
        load_build_config(_write(work, "missing.toml", packs_toml(parent="missing.gguf")))
    (work / "notgguf.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(BuildError, match=r"parent = 'notgguf.gguf': .*notgguf.gguf: not a GGUF file"):
        load_build_config(_write(work, "bad.toml", packs_toml(parent="notgguf.gguf")))
    with pytest.raises(BuildError, match=r"\[\[variant\]\] #1: unknown key\(s\) quantization; known: format"):
        load_build_config(_write(work, "typo.toml", packs_toml(parent="hf", variants='[[variant]]\nformat = "gguf"\nquantization = ["Q8_0"]\n')))


def _write(work: Path, name: str, text: str) -> Path:
    path = work / name
    path.write_text(text)
    return path


def test_commands_that_need_torch_say_what_to_install(work, tmp_path):
    out = tmp_path / "stats.safetensors"
    line = _one_error_line(torch_free(work, "calibrate", "hf", "--data", "data.jsonl", "--pairs", "en-de",
                                      "--teacher-forced", "--out", str(out)))
    assert "torch is missing" in line and "pip install 'edge-translation-packager[build]'" in line
    assert not out.exists()
    line = _one_error_line(torch_free(work, "export", "onnx", "hf", "--out", str(tmp_path / "onnx")))
    assert "is missing" in line and "[build]" in line
