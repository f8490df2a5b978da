"""Expert merging (`packager prune --reduce merge`): identical experts merge to the unmerged
model, the weighted average is what the docs say, the output passes the lineage check and
records its merge map, and invalid merge maps are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import WORDS, _load_all, _save_single, build_tiny

from packager.core.arch import load_arch
from packager.core.errors import CheckpointError
from packager.merge import MergeError, merge_prune, validate_merge_map
from packager.planning import PlanSettings, make_plan
from packager.prune import prune_checkpoint, read_provenance


def _records(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(WORDS, size=5)]
        out.append({"src_lang": "en", "tgt_lang": "de", "src": " ".join(words), "tgt": " ".join(words[::-1])})
    return out


def _calibrate(model: Path, calib: Path):
    from packager.calibrate import CalibrationSettings, calibrate

    return calibrate(model, [calib], CalibrationSettings(pairs=("en-de", "de-en"), teacher_forced=True, batch_size=8))


def _identical_experts(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    arch = load_arch(config)
    tensors, files = _load_all(model_dir)
    for layer_idx in arch.moe_layers(config):
        first = arch.expert_tensor_names(layer_idx, 0)
        for expert_idx in range(1, arch.n_experts(config, layer_idx)):
            for role, name in arch.expert_tensor_names(layer_idx, expert_idx).items():
                tensors[name] = tensors[first[role]].clone()
    _save_single(model_dir, tensors, files)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("merge")
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in _records(24)))
    return work, calib


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_identical_experts_merge_to_the_unmerged_model(work):
    from packager.masking import expert_mask
    from packager.core.pruned_model import load_pruned

    work_dir, calib = work
    parent = build_tiny("qwen3_moe", work_dir / "same", seed=3)
    _identical_experts(parent)
    stats = _calibrate(parent, calib)
    plan = make_plan(stats, PlanSettings(langs=("de",), drop_ratio=0.5, allocation="uniform"))
    merged = merge_prune(parent, plan, work_dir / "same-merged", stats=stats, calib=[calib])
    dropped = prune_checkpoint(parent, plan, work_dir / "same-dropped")
    ids = torch.tensor([[1, 5, 6, 9, 10, 11, 12, 7, 13, 14]])
    parent_model = load_pruned(parent)
    with expert_mask(parent_model, plan.keep):
        masked = _logits(parent_model, ids)
    merged_logits = _logits(load_pruned(merged), ids)
    torch.testing.assert_close(merged_logits, _logits(load_pruned(dropped), ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_logits, masked, rtol=0, atol=1e-5)


def test_merge_weights_map_and_lineage(work):
    from packager.core.checkpoint import CheckpointReader
    from packager.distill import check_lineage

    work_dir, calib = work
    parent = build_tiny("qwen3_moe", work_dir / "parent", seed=4)
    stats = _calibrate(parent, calib)
    plan = make_plan(stats, PlanSettings(langs=("de",), drop_ratio=0.75, allocation="uniform"))
    merged = merge_prune(parent, plan, work_dir / "merged", stats=stats, calib=[calib])
    dropped = prune_checkpoint(parent, plan, work_dir / "dropped")
    record = read_provenance(merged)
    assert record["reduce"] == "merge"
    merge = record["merge"]
    config = json.loads((parent / "config.json").read_text())
    arch = load_arch(config)
    for layer_idx in arch.moe_layers(config):
        kept = plan.keep[layer_idx]
        pairs = merge["map"][str(layer_idx)]
        assert sorted(d for d, _ in pairs) == [e for e in range(8) if e not in kept]
        assert all(k in kept for _, k in pairs)
    assert "router rows unchanged" in merge["router"]
    # the weighted average, recomputed from the parent's tensors
    layer_idx = arch.moe_layers(config)[0]
    kept = sorted(plan.keep[layer_idx])
    mass = merge["mass"][str(layer_idx)]
    with CheckpointReader(parent) as p, CheckpointReader(merged) as m, CheckpointReader(dropped) as d:
        for new_idx, target in enumerate(kept):
            members = [target] + [src for src, dst in merge["map"][str(layer_idx)] if dst == target]
            weights = np.array([mass[e] for e in members]) / sum(mass[e] for e in members)
            for role in ("gate", "up", "down"):
                expected = sum(w * p.get(arch.expert_tensor_names(layer_idx, e)[role]).double() for w, e in zip(weights, members))
                got = m.get(arch.expert_tensor_names(layer_idx, new_idx)[role]).double()
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
                if len(members) == 1:
                    assert torch.equal(got.float(), d.get(arch.expert_tensor_names(layer_idx, new_idx)[role]))
        router = arch.router_weight_name(layer_idx)
        assert torch.equal(m.get(router), d.get(router))
    assert any(len([1 for _, k in merge["map"][str(i)] if k == t]) for i in arch.moe_layers(config) for t in plan.keep[i])
    lineage = check_lineage(merged, parent)
    assert lineage.keep == {i: sorted(v) for i, v in plan.keep.items()}


def test_given_merge_map_and_refusals(work):
    work_dir, calib = work
    parent = build_tiny("qwen3_moe", work_dir / "given", seed=5)
    stats = _calibrate(parent, calib)
    plan = make_plan(stats, PlanSettings(langs=("de",), drop_ratio=0.5, allocation="uniform"))
    layers = sorted(plan.keep)
    kept0 = plan.keep[layers[0]]
    dropped0 = [e for e in range(8) if e not in kept0]
    good = {str(layers[0]): [[dropped0[0], kept0[0]], [dropped0[1], kept0[0]]]}
    out = merge_prune(parent, plan, work_dir / "given-merged", stats=stats, merge_map=good)
    assert read_provenance(out)["merge"]["map"] == {str(layers[0]): sorted(good[str(layers[0])])}
    bad_maps = {
        "kept": {str(layers[0]): [[kept0[1], kept0[0]]]},                            # a kept expert merged away
        "twice": {str(layers[0]): [[dropped0[0], kept0[0]], [dropped0[0], kept0[1]]]},  # a dropped expert named twice
        "target": {str(layers[0]): [[dropped0[0], dropped0[1]]]},                   # a dropped expert as the target
        "range": {str(layers[0]): [[99, kept0[0]]]},
        "layer": {"57": [[dropped0[0], kept0[0]]]},
    }
    messages = {"kept": "is kept by the plan", "twice": "merged twice", "target": "is not kept", "range": "does not exist",
                "layer": "not an MoE layer"}
    for what, bad in bad_maps.items():
        with pytest.raises(MergeError, match=messages[what]):
            validate_merge_map(bad, plan.keep, 8)
        with pytest.raises(MergeError, match=messages[what]):
            merge_prune(parent, plan, work_dir / f"bad-{what}", stats=stats, merge_map=bad)
        assert not (work_dir / f"bad-{what}").exists()
    # a merged checkpoint whose recorded map was edited to a dropped target is refused on read
    path = out / "pruning.json"
    record = json.loads(path.read_text())
    record["merge"]["map"][str(layers[0])][0][1] = dropped0[2]
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="is not kept"):
        read_provenance(out)


def test_refuses_unsupported(work):
    from tiny_models import write_fused_layout

    work_dir, calib = work
    parent = build_tiny("qwen3_moe", work_dir / "fused", seed=6)
    stats = _calibrate(parent, calib)
    write_fused_layout(parent)
    plan = make_plan(stats, PlanSettings(langs=("de",), drop_ratio=0.5, allocation="uniform"))
    with pytest.raises(MergeError, match="fused experts"):
        merge_prune(parent, plan, work_dir / "fused-out", stats=stats, calib=[calib])
