"""`packager inspect` / `packager prune` through the real entry point: bad inputs give exactly
one `error: ...` line, exit 1, and leave nothing at the output path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from packager_cli import run_cli
from tiny_models import build_tiny

from packager.core.arch import load_arch
from packager.core.fingerprint import model_fingerprint
from packager.core.plan_file import Plan


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    return build_tiny("qwen2_moe", tmp_path_factory.mktemp("qwen2") / "parent")


@pytest.fixture(scope="module")
def good_keep(qwen2) -> dict[int, list[int]]:
    config = json.loads((qwen2 / "config.json").read_text())
    return {layer_idx: [0, 2, 5, 7] for layer_idx in load_arch(config).moe_layers(config)}


def _plan_file(tmp_path: Path, data: dict, name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _plan_data(model_dir: Path, keep: dict) -> dict:
    return {"model_fingerprint": model_fingerprint(model_dir), "keep": {str(k): v for k, v in keep.items()}, "meta": {}}


def assert_one_error(monkeypatch, capsys, tmp_path, args, *fragments) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial directory either
    return lines[0]


def test_prune_cli_success_and_inspect(monkeypatch, capsys, tmp_path, qwen2, good_keep):
    plan = _plan_file(tmp_path, _plan_data(qwen2, good_keep))
    code, out, err = run_cli(monkeypatch, capsys, "prune", str(qwen2), "--plan", str(plan), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "pruned checkpoint written to" in out
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "out"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["family"] == "qwen2_moe"
    assert summary["experts_per_layer"] == {"0": 4, "1": 4}
    assert summary["top_k"] == 2
    assert summary["shared_experts"] is True
    parent = json.loads(run_cli(monkeypatch, capsys, "inspect", str(qwen2), "--json")[1])
    # 8 -> 4 experts: routed expert params halve, everything else is unchanged
    assert summary["split"]["routed_experts"]["params"] * 2 == parent["split"]["routed_experts"]["params"]
    for part in ("shared_experts", "other"):
        assert summary["split"][part] == {**parent["split"][part], "params_share": summary["split"][part]["params_share"],
                                          "bytes_share": summary["split"][part]["bytes_share"]}
    assert summary["split"]["routers"]["params"] * 2 == parent["split"]["routers"]["params"]
    assert summary["pruned_from"] == parent["fingerprint"]
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(qwen2))
    assert code == 0 and "qwen2_moe" in out and "routed experts" in out and "8 per layer" in out


def test_dry_run_writes_nothing(monkeypatch, capsys, tmp_path, qwen2):
    keep = {0: [0, 1, 2, 3, 4, 5], 1: [6, 7]}
    plan = _plan_file(tmp_path, _plan_data(qwen2, keep))
    code, out, err = run_cli(monkeypatch, capsys, "prune", str(qwen2), "--plan", str(plan), "--out",
                             str(tmp_path / "out"), "--dry-run")
    assert code == 0, err
    assert "layer 0: 8 -> 6 experts" in out and "layer 1: 8 -> 2 experts" in out and "non-uniform" in out
    assert not (tmp_path / "out").exists()
    from packager.prune import describe_prune, prune_checkpoint

    summary = describe_prune(qwen2, plan)
    out_dir = prune_checkpoint(qwen2, plan, tmp_path / "out")
    written = json.loads((out_dir / "pruning.json").read_text())["output"]["tensor_bytes"]
    assert summary["output_tensor_bytes"] == written
    # routed experts are half of the 8 experts' bytes in total: 8 of 16 kept
    parent = json.loads(run_cli(monkeypatch, capsys, "inspect", str(qwen2), "--json")[1])
    routed = parent["split"]["routed_experts"]["bytes"]
    routers = parent["split"]["routers"]["bytes"]
    assert summary["input_tensor_bytes"] - written == (routed + routers) // 2


def test_output_exists_without_force(monkeypatch, capsys, tmp_path, qwen2, good_keep):
    plan = _plan_file(tmp_path, _plan_data(qwen2, good_keep))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep-me.txt").write_text("user data")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(monkeypatch, capsys, "prune", str(qwen2), "--plan", str(plan), "--out", str(existing))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "output path exists" in err and "--force" in err
    assert (existing / "keep-me.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    code, _, err = run_cli(monkeypatch, capsys, "prune", str(qwen2), "--plan", str(plan), "--out", str(existing), "--force")
    assert code == 0, err
    assert not (existing / "keep-me.txt").exists() and (existing / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", [
    "expert-out-of-range", "layer-missing", "layer-does-not-exist", "duplicate-ids", "fewer-than-top-k",
    "other-model", "shared-expert-named", "shared-expert-id", "not-json",
])
def test_bad_plans(monkeypatch, capsys, tmp_path, qwen2, good_keep, case):
    data = _plan_data(qwen2, good_keep)
    expected: tuple[str, ...]
    if case == "expert-out-of-range":
        data["keep"]["1"] = [0, 2, 5, 8]
        expected = ("layer 1", "expert 8 does not exist", "0..7")
    elif case == "layer-missing":
        del data["keep"]["1"]
        expected = ("MoE layer(s) [1]",)
    elif case == "layer-does-not-exist":
        data["keep"]["5"] = [0, 1]
        expected = ("layer 5 does not exist", "2 layers")
    elif case == "duplicate-ids":
        data["keep"]["0"] = [0, 2, 2, 7]
        expected = ("layer 0", "[2] listed more than once")
    elif case == "fewer-than-top-k":
        data["keep"]["0"] = [3]
        expected = ("layer 0 keeps 1 expert(s)", "top-k=2")
    elif case == "other-model":
        other = build_tiny("qwen2_moe", tmp_path / "other-model", seed=1)
        data["model_fingerprint"] = model_fingerprint(other)
        shutil.rmtree(other)
        expected = ("plan was made for model", "make a plan for this model")
    elif case == "shared-expert-named":
        data["keep"]["0"] = [0, 1, "shared_expert"]
        expected = ("'shared_expert'", "shared experts are never pruned")
    elif case == "shared-expert-id":
        data["keep"]["0"] = [0, 1, 8]
        expected = ("expert 8 does not exist", "shared experts are not numbered and never pruned")
    else:
        expected = ("not valid JSON",)
    plan = _plan_file(tmp_path, data)
    if case == "not-json":
        plan.write_text('{"keep": {"0": [1, 2,')
    assert_one_error(monkeypatch, capsys, tmp_path,
                     ["prune", str(qwen2), "--plan", str(plan), "--out", str(tmp_path / "out")], str(plan), *expected)


@pytest.mark.parametrize("case", ["truncated", "corrupt-header", "missing-shard", "unknown-architecture",
                                  "pickle-only", "no-model-dir"])
def test_bad_checkpoints(monkeypatch, capsys, tmp_path, qwen2, good_keep, case):
    plan = _plan_file(tmp_path, _plan_data(qwen2, good_keep))
    model = tmp_path / "model"
    if case == "missing-shard":
        build_tiny("qwen2_moe", model, max_shard_size="40KB")
        shards = sorted(model.glob("model-*.safetensors"))
        shards[1].unlink()
        expected = (f"missing shard file(s) {shards[1].name}", "model.safetensors.index.json")
    elif case != "no-model-dir":
        shutil.copytree(qwen2, model)
    weights = model / "model.safetensors"
    if case == "truncated":
        size = weights.stat().st_size
        with open(weights, "r+b") as fh:
            fh.truncate(size - 100)
        expected = (str(weights), "truncated")
    elif case == "corrupt-header":
        with open(weights, "r+b") as fh:
            fh.seek(8)
            fh.write(b"\x00garbage{")
        expected = (str(weights), "corrupt safetensors header")
    elif case == "unknown-architecture":
        config = json.loads((model / "config.json").read_text())
        config["model_type"] = "llama"
        (model / "config.json").write_text(json.dumps(config))
        expected = ("'llama' is not a supported MoE family", "qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral")
    elif case == "pickle-only":
        weights.unlink()
        (model / "pytorch_model.bin").write_bytes(b"not loaded")
        expected = ("only pickle weights", "convert the checkpoint to safetensors")
    elif case == "no-model-dir":
        expected = (str(model), "model directory not found")
    assert_one_error(monkeypatch, capsys, tmp_path,
                     ["prune", str(model), "--plan", str(plan), "--out", str(tmp_path / "out")], *expected)
    if case in ("truncated", "corrupt-header", "unknown-architecture"):
        assert_one_error(monkeypatch, capsys, tmp_path, ["inspect", str(model)], *expected)


def test_group_routing_plan_is_refused_with_reason(monkeypatch, capsys, tmp_path):
    model = build_tiny("deepseek_v3", tmp_path / "ds")
    config = json.loads((model / "config.json").read_text())
    arch = load_arch(config)
    # 4 experts kept, but 3 in group 0 (experts 0-3) and 1 in group 1 (experts 4-7)
    keep = {layer_idx: [0, 1, 2, 5] for layer_idx in arch.moe_layers(config)}
    plan = Plan(model_fingerprint(model), keep).save(tmp_path / "plan.json")
    line = assert_one_error(monkeypatch, capsys, tmp_path,
                            ["prune", str(model), "--plan", str(plan), "--out", str(tmp_path / "out")],
                            "layer 1 keeps [3, 1] experts in its 2 routing groups", "same number kept in every group")
    assert str(plan) in line
