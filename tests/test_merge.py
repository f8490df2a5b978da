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


def _permuted_copies(model_dir: Path, keep: dict, seed: int) -> dict[int, dict[int, tuple[int, np.ndarray]]]:
    """Rewrite every dropped expert as a neuron-permuted copy of a kept expert (kept experts in turn,
    so several dropped experts share a partner): {layer: {dropped: (kept, perm)}}, where the dropped
    expert's neuron perm[i] is the kept expert's neuron i."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = load_arch(config)
    tensors, files = _load_all(model_dir)
    rng = np.random.default_rng(seed)
    applied: dict[int, dict[int, tuple[int, np.ndarray]]] = {}
    for layer_idx in arch.moe_layers(config):
        kept = sorted(keep[layer_idx])
        dropped = [e for e in range(arch.n_experts(config, layer_idx)) if e not in kept]
        applied[layer_idx] = {}
        for j, d in enumerate(dropped):
            k = kept[j % len(kept)]
            source = arch.expert_tensor_names(layer_idx, k)
            perm = rng.permutation(tensors[source["gate"]].shape[0])
            inverse = torch.as_tensor(np.argsort(perm))
            for role, name in arch.expert_tensor_names(layer_idx, d).items():
                original = tensors[source[role]]
                tensors[name] = (original[:, inverse] if role == "down" else original[inverse]).clone()
            applied[layer_idx][d] = (k, perm)
    _save_single(model_dir, tensors, files)
    return applied


@pytest.fixture(scope="module")
def permuted(work):
    work_dir, calib = work
    parent = build_tiny("qwen3_moe", work_dir / "permuted", seed=7)
    stats = _calibrate(parent, calib)
    # 75%: 2 kept and 6 dropped experts per layer, so 3 permuted copies fold into each kept expert
    plan = make_plan(stats, PlanSettings(langs=("de",), drop_ratio=0.75, allocation="uniform"))
    applied = _permuted_copies(parent, plan.keep, seed=8)   # the stats' router-only fingerprint still holds
    return parent, stats, plan, applied


def test_aligned_merge_of_permuted_copies_is_the_kept_expert(work, permuted):
    from packager.masking import expert_mask
    from packager.core.pruned_model import load_pruned

    work_dir, calib = work
    parent, stats, plan, applied = permuted
    ids = torch.tensor([[1, 5, 6, 9, 10, 11, 12, 7, 13, 14], [1, 20, 21, 22, 7, 30, 31, 32, 33, 34]])
    parent_model = load_pruned(parent)
    with expert_mask(parent_model, plan.keep):
        masked = _logits(parent_model, ids)
    outputs = {}
    for align in ("none", "activations", "weights"):
        out = merge_prune(parent, plan, work_dir / f"permuted-{align}", stats=stats, calib=[calib], align=align)
        merge = read_provenance(out)["merge"]
        # identical outputs make each copy's partner the expert it was copied from
        assert merge["map"] == {str(i): [[d, k] for d, (k, _) in sorted(pairs.items())] for i, pairs in applied.items()}
        assert merge["align"]["method"] == align
        outputs[align] = _logits(load_pruned(out), ids)
    for align in ("activations", "weights"):
        torch.testing.assert_close(outputs[align], masked, rtol=0, atol=1e-5)
        for layer in read_provenance(work_dir / f"permuted-{align}")["merge"]["align"]["layers"].values():
            assert layer["mean_matched"] == pytest.approx(1.0, abs=1e-6)
            assert layer["mean_unaligned"] < 0.5
    # averaging as stored mixes unrelated neurons: the kept experts change and so do the logits
    assert (outputs["none"] - masked).abs().max() > 0.1


def test_alignment_finds_the_applied_permutation(work, permuted):
    from packager.core.checkpoint import CheckpointReader
    from packager.merge import align_pairs, calibration_hidden_states, read_records

    work_dir, calib = work
    parent, stats, plan, applied = permuted
    pairs = {i: [(d, k) for d, (k, _) in sorted(p.items())] for i, p in applied.items()}
    hidden = calibration_hidden_states(parent, read_records([calib], 256), sorted(plan.keep))
    with CheckpointReader(parent) as reader:
        arch = load_arch(reader.config)
        for method in ("activations", "weights"):
            perms, _ = align_pairs(reader, arch, pairs, method, hidden)
            for layer_idx, layer_pairs in applied.items():
                assert sorted(perms[layer_idx]) == sorted(layer_pairs)
                for d, (_, perm) in layer_pairs.items():
                    assert perms[layer_idx][d].tolist() == perm.tolist(), (method, layer_idx, d)


def test_merge_align_refusals(work, permuted, tmp_path, monkeypatch, capsys):
    from packager_cli import run_cli

    work_dir, calib = work
    parent, stats, plan, applied = permuted
    with pytest.raises(MergeError, match="--merge-align 'neurons': choose one of none, activations, weights"):
        merge_prune(parent, plan, tmp_path / "bad-align", stats=stats, calib=[calib], align="neurons")
    assert not (tmp_path / "bad-align").exists()
    given = {str(i): [[d, k] for d, (k, _) in sorted(p.items())] for i, p in applied.items()}
    with pytest.raises(MergeError, match="--merge-align activations needs calibration records"):
        merge_prune(parent, plan, tmp_path / "no-calib", stats=stats, merge_map=given, align="activations")
    assert not (tmp_path / "no-calib").exists()
    plan_path, stats_path = tmp_path / "plan.json", tmp_path / "stats.safetensors"
    plan.save(plan_path)
    stats.save(stats_path)
    common = ["prune", str(parent), "--plan", str(plan_path), "--stats", str(stats_path), "--calib", str(calib)]
    code, out, err = run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "cli-bad"), "--reduce", "merge",
                             "--merge-align", "neurons")
    assert (code, out) == (1, "")
    assert err.splitlines() == ["error: --merge-align 'neurons': choose one of none, activations, weights"]
    code, out, err = run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "cli-drop"), "--merge-align", "weights")
    assert (code, out) == (1, "")
    assert err.splitlines() == ["error: --merge-align weights aligns experts before merging: it needs --reduce merge"]
    assert not (tmp_path / "cli-bad").exists() and not (tmp_path / "cli-drop").exists()
    # the option reaches the merge: a weights-aligned merge through the CLI writes the same tensors
    code, out, err = run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "cli"), "--reduce", "merge",
                             "--merge-align", "weights")
    assert code == 0, err
    assert read_provenance(tmp_path / "cli")["merge"]["align"]["method"] == "weights"
    from packager.core.checkpoint import CheckpointReader
    with CheckpointReader(tmp_path / "cli") as a, CheckpointReader(work_dir / "permuted-weights") as b:
        assert sorted(a.names()) == sorted(b.names())
        assert all(torch.equal(a.get(name), b.get(name)) for name in a.names())
