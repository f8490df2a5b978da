"""The default's training script: a warm-started run resumes from its checkpoint, and an
--export-only of that checkpoint records the settings that trained the weights (not the export
command's own defaults) together with the warm start's record."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_DEV = REPO / "data" / "harvest" / "eval" / "dev.jsonl"
DEFAULT = REPO / "models" / "default"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "models.train_default", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    if not EVAL_DEV.is_file():
        pytest.skip("needs the harvested evaluation split (make data-eval)")
    lines = EVAL_DEV.read_text(encoding="utf-8").splitlines()
    data = tmp_path_factory.mktemp("train-data")
    (data / "train.jsonl").write_text("\n".join(lines[:160]) + "\n", encoding="utf-8")
    (data / "dev.jsonl").write_text("\n".join(lines[160:200]) + "\n", encoding="utf-8")
    return data


def test_warm_started_run_resumes_and_export_only_keeps_the_recipe(tiny_data, tmp_path):
    work, out, exported = tmp_path / "work", tmp_path / "out", tmp_path / "exported"
    recipe = ["--data", str(tiny_data), "--work", str(work), "--init", str(DEFAULT), "--schedule", "wsd",
              "--max-tokens", "2500", "--warmup-tokens", "200", "--decay-fraction", "0.5", "--lr", "3e-4",
              "--tokens-per-batch", "400", "--threads", "1", "--eval-examples", "20", "--out", str(out),
              "--ema", "0.9", "--length-weighting", "--focus", "de", "--focus-repeat", "1",
              "--monitor", str(tiny_data / "dev.jsonl")]
    first = _run(*recipe)
    assert first.returncode == 0, first.stderr[-2000:]
    trained = json.loads((out / "training.json").read_text())
    assert trained["tokens"] >= 2500 and trained["lr"] == 3e-4 and trained["max_tokens"] == 2500
    assert trained["init_training"] == json.loads((DEFAULT / "training.json").read_text())
    assert trained["ema"] == 0.9 and trained["length_weighting"] and trained["focus"] == "de"

    weights = (out / "model.safetensors").read_bytes()
    again = _run(*recipe)  # the schedule is done: it resumes, trains nothing, exports the same weights
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed at step {trained['steps']}" in again.stderr
    assert (out / "model.safetensors").read_bytes() == weights
    assert json.loads((out / "training.json").read_text())["steps"] == trained["steps"]

    only = _run("--work", str(work), "--export-only", "--out", str(exported))
    assert only.returncode == 0, only.stderr[-2000:]
    record = json.loads((exported / "training.json").read_text())
    # the export command ran with the parser's defaults (lr 1.5e-3, time-cosine, no init): none of them leak in
    assert record["lr"] == 3e-4 and record["schedule"] == "wsd" and record["max_tokens"] == 2500
    assert record["tokens_per_batch"] == 400 and record["steps"] == trained["steps"]
    assert "--export-only" not in record["command"] and "--export-only" in record["export_command"]
    assert record["init_training"] == trained["init_training"]
    assert (exported / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
