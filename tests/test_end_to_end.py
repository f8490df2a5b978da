"""End to end on a tiny random qwen3_moe through `packager build`: calibrate -> plan -> prune ->
export (GGUF uniform, ONNX dynamic) -> verify -> bundle -> edge-translate -> report; then
resume (finished steps are skipped) and bad build files."""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from packager.build import BuildError, build, load_build_config
from packager.core.fingerprint import model_fingerprint
from runtime.bundle import load_bundle
import packs_file
from test_bundle import run_cli

VENV_BIN = Path(sys.executable).parent
HAS_ONNX_EXPORT = importlib.util.find_spec("converters.onnx.export") is not None
VARIANTS = '''
[[variant]]
format = "gguf"
quant = ["F32", "Q8_0"]
''' + ('''
[[variant]]
format = "onnx"
allocation = "dynamic"
quant = ["fp32"]
''' if HAS_ONNX_EXPORT else "")


def packs_toml(drops: str = "[0.5]") -> str:
    return packs_file.packs_toml("parent", VARIANTS, drops, extra="archive = true")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return packs_file.build_dir(tmp_path_factory.mktemp("e2e"), packs_toml())


@pytest.fixture(scope="module")
def first_build(work) -> dict:
    return build(work / "packs.toml", work / "run", console=quiet(), command="pytest")


def test_build_runs_every_stage(first_build, work):
    statuses = {step["id"]: step["status"] for step in first_build["steps"]}
    assert set(statuses.values()) == {"done"}
    expected = ["calibrate/en-de", "calibrate/en-fr", "calibrate", "parent/gguf/export", "parent/gguf/F32/verify", "parent/gguf/Q8_0/verify",
                "en-de-fr/d50-uniform-routing-mass/plan", "en-de-fr/d50-uniform-routing-mass/prune",
                "en-de-fr/d50-uniform-routing-mass/gguf/export", "en-de-fr/d50-uniform-routing-mass/gguf/F32/verify",
                "bundle/en-de-fr-gguf-F32-d50-uniform", "en-de-fr/d50-uniform-routing-mass/gguf/Q8_0/verify",
                "bundle/en-de-fr-gguf-Q8_0-d50-uniform"]
    if HAS_ONNX_EXPORT:
        expected[6:6] = ["parent/onnx/export", "parent/onnx/fp32/verify"]
        expected += ["en-de-fr/d50-dynamic-routing-mass/plan", "en-de-fr/d50-dynamic-routing-mass/prune",
                     "en-de-fr/d50-dynamic-routing-mass/onnx/export", "en-de-fr/d50-dynamic-routing-mass/onnx/fp32/verify",
                     "bundle/en-de-fr-onnx-fp32-d50-dynamic"]
    assert list(statuses) == expected + ["report"]
    build_record = json.loads((work / "run" / "build.json").read_text())
    assert build_record["packs_sha256"] and build_record["command"] == "pytest"
    assert len(build_record["bundles"]) == (3 if HAS_ONNX_EXPORT else 2)


def test_pruned_bundles_describe_their_plan(first_build, work):
    parent_fp = model_fingerprint(work / "parent")
    for bundle_dir in map(Path, first_build["bundles"]):
        bundle = load_bundle(bundle_dir)
        manifest = bundle.manifest
        assert manifest.directions == ["en->de", "en->fr"]
        assert manifest.languages == ["en", "de", "fr"]
        assert manifest.parent_fingerprint == parent_fp
        meta = manifest.plan["meta"] if "meta" in manifest.plan else manifest.plan
        assert meta["drop_ratio"] == 0.5 and meta["languages"] == ["de", "fr"]
        assert sum(manifest.n_experts.values()) == 12  # 3 MoE layers x 8 experts, half dropped
        if manifest.format == "gguf":
            assert set(manifest.n_experts.values()) == {4}  # uniform: stock llama.cpp
        assert manifest.metrics["labels"]["drop_ratio"] == 0.5
        assert manifest.metrics["ratios"]["file_bytes"] < 1.0
        assert manifest.min_ram_bytes > manifest.metrics["footprint"]["peak_rss_bytes"]
        assert {item["use"] for item in manifest.licenses} == {"evaluation", "calibration"}
        assert bundle_dir.with_name(bundle_dir.name + ".tar").is_file()


def test_bundles_translate_with_edge_translate(first_build):
    for bundle_dir in first_build["bundles"]:
        with load_bundle(bundle_dir).open(n_threads=1) as backend:
            expected = backend.translate("Open the file", "en", "fr", max_new_tokens=6)
        result = run_cli(str(VENV_BIN / "edge-translate"), bundle_dir, "Open the file", "--from", "en", "--to", "fr",
                         "--max-new-tokens", "6", "--threads", "1")
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n"


def test_report_covers_parent_and_pruned(first_build, work):
    report = json.loads((work / "run" / "report" / "report.json").read_text())
    rows = report["packs"]["en->de,fr"]["rows"]
    roles = sorted((row["role"], row["format"], row["quantization"]) for row in rows)
    expected = [("parent", "gguf", "F32"), ("parent", "gguf", "Q8_0"), ("pruned", "gguf", "F32"), ("pruned", "gguf", "Q8_0")]
    if HAS_ONNX_EXPORT:
        expected = sorted(expected + [("parent", "onnx", "fp32"), ("pruned", "onnx", "fp32")])
    assert roles == expected
    pruned = next(r for r in rows if r["role"] == "pruned" and r["quantization"] == "F32")
    assert pruned["drop_ratio"] == 0.5 and pruned["allocation"] == "uniform" and pruned["n"] == 7
    assert (work / "run" / "report" / "index.html").stat().st_size > 10_000


def test_resume_skips_finished_steps(first_build, work):
    bundle = Path(first_build["bundles"][0])
    shutil.rmtree(bundle)
    again = build(work / "packs.toml", work / "run", console=quiet(), command="pytest")
    statuses = {step["id"]: step["status"] for step in again["steps"]}
    redone = sorted(step_id for step_id, status in statuses.items() if status == "done")
    assert redone == sorted([f"bundle/{bundle.name}", "report"])
    assert load_bundle(bundle).manifest.directions == ["en->de", "en->fr"]
    planned = build(work / "packs.toml", work / "run", console=quiet(), dry_run=True)
    assert {step["status"] for step in planned["steps"][:-1]} == {"up to date"}


@pytest.mark.parametrize("module, redone", [
    ("packager.verify", lambda step_id: step_id.endswith("/verify") or step_id.startswith("bundle/")),
    ("packager.prune", lambda step_id: "d50-" in step_id and not step_id.endswith("/plan")),
    ("packager.calibrate", lambda step_id: not step_id.startswith("parent/")),
], ids=["verify", "prune", "calibrate"])
def test_a_code_change_redoes_its_steps_and_those_downstream(first_build, work, monkeypatch, module, redone):
    import packager.build.graph as graph_module

    real = graph_module._code
    monkeypatch.setattr(graph_module, "_code", lambda name: real(name) + ("-edited" if name == module else ""))
    planned = build(work / "packs.toml", work / "run", console=quiet(), dry_run=True)
    statuses = {step["id"]: step["status"] for step in planned["steps"] if step["id"] != "report"}
    assert statuses == {step_id: "to do" if redone(step_id) else "up to date" for step_id in statuses}


def test_a_second_build_into_the_same_run_dir_is_refused(first_build, work):
    import os

    from packager.build import run_dir_lock

    # a build in another process holds the lock (a separate open file: flock conflicts even in-process)
    with run_dir_lock(work / "run"):
        with pytest.raises(BuildError, match=rf"another `packager build` \(pid {os.getpid()}\) is writing this run "
                                             r"directory; wait for it to finish or choose another --out"):
            build(work / "packs.toml", work / "run", console=quiet(), dry_run=True)
    # released with its holder: the next build runs
    planned = build(work / "packs.toml", work / "run", console=quiet(), dry_run=True)
    assert planned["steps"]


def test_bad_build_files(work):
    def config(text: str) -> Path:
        path = work / "bad.toml"
        path.write_text(text)
        return path

    base = packs_toml()
    with pytest.raises(BuildError, match=r"bad.toml: parent = 'nowhere': directory .* not found"):
        load_build_config(config(base.replace('parent = "parent"', 'parent = "nowhere"')))
    with pytest.raises(BuildError, match="does not involve English"):
        load_build_config(config(base.replace('directions = "en->de,fr"', 'directions = "de->fr"')))
    with pytest.raises(BuildError, match='GGUF needs allocation = "uniform"'):
        load_build_config(config(base.replace('format = "gguf"', 'format = "gguf"\nallocation = "dynamic"')))
    with pytest.raises(BuildError, match=r"drop_ratios must be a non-empty list of ratios in \(0, 1\)"):
        load_build_config(config(base.replace("drop_ratios = [0.5]", "drop_ratios = [1.5]")))
    with pytest.raises(BuildError, match="not valid TOML"):
        load_build_config(config("parent = "))
    with pytest.raises(BuildError, match=r"verify.test = 'missing.jsonl': file .* not found"):
        load_build_config(config(base.replace('test = "data.jsonl"', 'test = "missing.jsonl"')))
    result = subprocess.run([str(VENV_BIN / "packager"), "build", str(work / "nope.toml"), "--out", str(work / "r")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {work / 'nope.toml'}: build file not found; see packs/demo.toml for an example"]


def test_packs_file_can_stream_calibration(work):
    """Execution keys of [calibration] reach CalibrationSettings (paths resolved beside the file)."""
    from packager.calibration_data import CalibrationSettings

    base = packs_toml()
    path = work / "streamed.toml"
    (work / "spill").mkdir(exist_ok=True)
    path.write_text(base.replace("batch_size = 4", 'batch_size = 4\nexecution = "streamed"\ndtype = "bfloat16"\n'
                                                   'expert_group_mb = 2\nspill_dir = "spill"'))
    config = load_build_config(path)
    assert config.calibration["execution"] == "streamed" and config.calibration["dtype"] == "bfloat16"
    assert config.calibration["expert_group_bytes"] == 2 * 1024**2
    assert config.calibration["spill_dir"] == str((work / "spill").resolve())
    settings = CalibrationSettings(pairs=("en-de",), **config.calibration)
    assert settings.execution == "streamed" and settings.expert_group_bytes == 2 * 1024**2
    path.write_text(base.replace("batch_size = 4", 'batch_size = 4\ngenerator = "parent.gguf"'))
    with pytest.raises(BuildError, match=r"calibration.generator = 'parent.gguf': file .* not found"):
        load_build_config(path)
    path.write_text(base.replace("batch_size = 4", 'batch_size = 4\nexecution = "fast"\nwarp = 9'))
    with pytest.raises(BuildError, match=r"\[calibration\] unknown key\(s\) warp"):
        load_build_config(path)
