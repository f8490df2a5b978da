"""`packager build --ray` (issue 21) on a local Ray instance (2 CPUs) and the tiny qwen3_moe:
the Ray build writes the same tensors and the same scores as the sequential build, also when
tasks raise or lose their worker mid-step (injected through $PACKAGER_BUILD_FAULT); a crashed
sequential driver leaves a lock behind that does not stop the re-run, which finishes the build
with the same outputs."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from rich.console import Console

from packager.build import BuildError, build, load_build_config
from packager.build.graph import make_graph
from packager.build.steps import FAULT_ENV, FAULTS_DIR, LOCK_NAME, STEPS_DIR
from packager.core.stats import RoutingStats
import packs_file
from import_blocker import blocker

PACKS = '''
parent = "parent"
drop_ratios = [0.5]
threads = 1

[calibration]
data = ["data.jsonl"]
max_sentences = 4
max_new_tokens = 6
batch_size = 2
slices = 2

[verify]
test = "data.jsonl"
max_new_tokens = 12
bootstrap = 0

[[variant]]
format = "gguf"
quant = ["F32", "Q8_0"]

[[pack]]
name = "en-de-fr"
directions = "en->de,fr"
'''
PREFIX = "en-de-fr/d50-uniform-routing-mass"
# one task raises a transient error after writing its outputs, one loses its worker (SIGKILL), one
# calibration shard raises: each once, then Ray retries it; the plan fails once (not retried):
# the first Ray build stops there and the second resumes
RETRIED = f"calibrate/en-de.s1of2:raise,{PREFIX}/prune:kill,{PREFIX}/gguf/Q8_0/verify:raise"
FAULTS = f"{RETRIED},{PREFIX}/plan:fail"
# file_bytes is left out: a GGUF records the command line that wrote it, so its size differs by a few bytes
SCORE_KEYS = ("chrf++", "bleu", "error_rate", "errors", "hit_token_limit", "n", "directions", "experts_kept",
              "per_layer", "chrf++_delta")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return packs_file.build_dir(tmp_path_factory.mktemp("ray_build"), PACKS)


@pytest.fixture(scope="module")
def sequential(work) -> dict:
    return build(work / "packs.toml", work / "seq", console=quiet(), command="pytest")


@pytest.fixture(scope="module")
def on_ray(work, sequential) -> tuple[dict, str]:
    """A Ray build with faults: the workers inherit the variable from the Ray instance started
    here; this process (the driver, and the sequential builds) does not see it."""
    os.environ[FAULT_ENV] = FAULTS
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        del os.environ[FAULT_ENV]
    try:
        with pytest.raises(BuildError) as failed:
            build(work / "packs.toml", work / "ray", console=quiet(), command="pytest", ray="local")
        console = quiet()
        record = build(work / "packs.toml", work / "ray", console=console, command="pytest", ray="local")
        again = build(work / "packs.toml", work / "ray", console=quiet(), command="pytest", ray="local")
        yield record, again, console.file.getvalue(), str(failed.value)
    finally:
        ray.shutdown()


def tensor_digest(path: Path) -> str:
    """sha256 over the tensors of a model file (names, types, shapes, bytes); a GGUF's metadata
    also records its provenance (the process's command line, the plan's path), which differs."""
    if path.suffix != ".gguf":  # the pruned safetensors: nothing run-specific in it
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from gguf import GGUFReader

    digest = hashlib.sha256()
    for tensor in GGUFReader(path).tensors:
        digest.update(f"{tensor.name}|{tensor.tensor_type.name}|{list(tensor.shape)}".encode())
        digest.update(tensor.data.tobytes())
    return digest.hexdigest()


def outputs(run_dir: Path) -> dict[str, str]:
    """Tensor digests of every model file (exports and bundles) under the run directory."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".gguf", ".safetensors")
             and "calibration" not in p.parts]
    return {p.relative_to(run_dir).as_posix(): tensor_digest(p) for p in sorted(files)}


def scores(run_dir: Path) -> dict[str, dict]:
    report = json.loads((run_dir / "report" / "report.json").read_text())
    return {row["name"]: {k: row.get(k) for k in SCORE_KEYS} for rows in report["packs"].values() for row in rows["rows"]}


def stats_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    return RoutingStats.load(run_dir / "calibration" / "stats.safetensors").tensors


def assert_same_results(run_dir: Path, reference: Path) -> None:
    expected = outputs(reference)
    assert len([f for f in expected if f.startswith("bundles/")]) == 2 and len(expected) >= 7
    assert outputs(run_dir) == expected
    assert scores(run_dir) == scores(reference)
    got, want = stats_tensors(run_dir), stats_tensors(reference)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_ray_build_matches_the_sequential_build(work, sequential, on_ray):
    record, _, _, _ = on_ray
    assert [s["id"] for s in record["steps"]] == [s["id"] for s in sequential["steps"]]
    assert [s["id"] for s in record["steps"][:5]] == [
        "calibrate/en-de.s1of2", "calibrate/en-de.s2of2", "calibrate/en-fr.s1of2", "calibrate/en-fr.s2of2", "calibrate"]
    statuses = {s["id"]: s["status"] for s in record["steps"]}
    # the first (failed) build finished the calibration; the plan and what follows ran now
    assert statuses["calibrate"] == "skipped" and set(statuses.values()) == {"done", "skipped"}
    assert all(status == "done" for step_id, status in statuses.items() if step_id.startswith(PREFIX) or step_id == "report")
    assert record["ray"]["cpus"] == 2 and record["ray"]["nodes"] == 1
    assert record["timing"]["tasks_run"] == list(statuses.values()).count("done")
    assert 0 < record["timing"]["critical_path_seconds"] <= record["timing"]["work_seconds"]
    assert_same_results(work / "ray", work / "seq")


def test_failed_tasks_are_retried_and_the_run_completes(work, on_ray):
    record, _, log, _ = on_ray
    fired = sorted(p.name for p in (work / "ray" / FAULTS_DIR).iterdir())
    assert fired == sorted(f"{item.rpartition(':')[0].replace('/', '__')}.{item.rpartition(':')[2]}"
                           for item in FAULTS.split(","))
    ran = record["timing"]["tasks_run"] - 1  # the report is the driver's
    assert "failed" not in log and f"[{ran}/{ran}]" in log
    assert not (work / "seq" / FAULTS_DIR).exists()  # the driver never saw the variable


def test_an_error_that_is_not_transient_stops_the_ray_build_and_a_rerun_resumes(on_ray):
    _, _, _, error = on_ray
    assert error == ("plan en-de-fr drop 50% routing-mass/uniform: injected fault (PACKAGER_BUILD_FAULT) "
                     "(finished steps are kept; run again to resume)")


def test_a_rerun_on_the_cluster_skips_what_is_done(on_ray):
    _, again, _, _ = on_ray
    assert {s["id"]: s["status"] for s in again["steps"] if s["status"] != "skipped"} == {"report": "done"}


def test_a_crashed_driver_and_its_stale_lock_are_recovered_by_a_rerun(work, sequential):
    """The sequential driver is killed (SIGKILL) after the prune wrote its model and before its
    record: the lock file still names the dead process, the pruned files have no record."""
    env = {**os.environ, FAULT_ENV: f"{PREFIX}/prune:kill", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    crashed = subprocess.run([sys.executable, "-m", "packager.cli", "build", "packs.toml", "--out", "crash"], cwd=work,
                             env=env, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    run_dir = work / "crash"
    dead_pid = int((run_dir / LOCK_NAME).read_text())
    assert dead_pid != os.getpid() and not Path(f"/proc/{dead_pid}").exists()
    records = {p.name for p in (run_dir / STEPS_DIR).iterdir()}
    assert f"{PREFIX.replace('/', '__')}__plan.json" in records
    assert f"{PREFIX.replace('/', '__')}__prune.json" not in records
    assert (run_dir / "packs" / "en-de-fr" / "d50-uniform-routing-mass" / "pruned").is_dir()

    again = build(work / "packs.toml", run_dir, console=quiet(), command="pytest")
    statuses = {s["id"]: s["status"] for s in again["steps"]}
    assert statuses[f"{PREFIX}/plan"] == "skipped" and statuses["calibrate"] == "skipped"
    assert statuses[f"{PREFIX}/prune"] == "done" and statuses["report"] == "done"
    assert int((run_dir / LOCK_NAME).read_text()) == os.getpid()
    assert_same_results(run_dir, work / "seq")


def test_calibration_shards_follow_the_packs_file(work, tmp_path):
    def calibration_ids(extra: str) -> list[str]:
        (work / "variant.toml").write_text(PACKS.replace("slices = 2\n", extra))
        graph = make_graph(load_build_config(work / "variant.toml"), tmp_path, None)
        return [s.id for s in graph.steps if s.id.startswith("calibrate")]

    assert calibration_ids("") == ["calibrate/en-de", "calibrate/en-fr", "calibrate"]
    assert calibration_ids('shard_by = "none"\n') == ["calibrate"]  # one run over every direction, no merge
    assert calibration_ids('shard_by = "none"\nslices = 2\n') == ["calibrate/all.s1of2", "calibrate/all.s2of2", "calibrate"]
    with pytest.raises(BuildError, match=r"\[calibration\] slices must be an integer from 1 to max_sentences \(4\), got 5"):
        calibration_ids("slices = 5\n")
    with pytest.raises(BuildError, match=r"\[calibration\] shard_by must be one of direction, none, got 'pair'"):
        calibration_ids('shard_by = "pair"\n')


def test_without_ray_installed_the_ray_build_says_what_to_install(work):
    no_ray = work / "no_ray"
    no_ray.mkdir(exist_ok=True)
    (no_ray / "sitecustomize.py").write_text(blocker("ray"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(no_ray), str(Path(__file__).parents[1])])}
    result = subprocess.run([sys.executable, "-m", "packager.cli", "build", "packs.toml", "--out", "no-ray", "--ray"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --ray: Ray is not installed; install it with pip install 'edge-translation-packager[ray]' "
        "(or build without --ray)"]
    assert not (work / "no-ray").exists()  # nothing written


def test_data_slices_cover_each_sentence_once(work):
    """Slices of a direction's sample merge to the statistics of the whole sample: counts exactly,
    sums up to fp64 summation order (the batches differ)."""
    from packager.calibrate import CalibrationSettings, calibrate
    from packager.core.stats import SEQUENCES, TOKENS, merge_stats

    def run(data_slice):
        settings = CalibrationSettings(pairs=("en-de",), teacher_forced=True, max_sentences=4, batch_size=2,
                                       data_slice=data_slice)
        return calibrate(work / "parent", [work / "data.jsonl"], settings)

    whole = run(None)
    merged = merge_stats([run((0, 3)), run((1, 3)), run((2, 3))])
    assert [p["sentences"]["en-de"] for p in merged.meta["provenance"]] == [2, 1, 1]
    assert sorted(merged.tensors) == sorted(whole.tensors)
    for name, value in whole.tensors.items():
        if name.split("/")[0] in (SEQUENCES, TOKENS, "selected", "reap_tokens"):
            assert np.array_equal(merged.tensors[name], value), name
        else:
            np.testing.assert_allclose(merged.tensors[name], value, rtol=1e-5, atol=1e-9, err_msg=name)
