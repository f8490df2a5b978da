"""Pruning: pruned model == parent with the dropped experts masked, kept experts bit-identical,
config and side files right, output loads and generates; for every family and layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, build_tiny, write_fused_layout, write_mxfp4_layout
from transformers import AutoModelForCausalLM

from packager import load_pruned
from packager.core.arch import PER_LAYER_COUNTS_KEY, load_arch
from packager.core.checkpoint import INDEX_NAME
from packager.core.fingerprint import model_fingerprint
from packager.masking import expert_mask
from packager.core.plan_file import Plan
from packager.prune import PROVENANCE_NAME, prune_checkpoint

TOLERANCE = 1e-5

# (layout variant id, family, helper that rewrites the parent's experts on disk)
VARIANTS = [pytest.param(f, None, id=f) for f in FAMILIES] + [
    pytest.param("qwen3_moe", write_fused_layout, id="qwen3_moe-fused"),
    pytest.param("mixtral", write_fused_layout, id="mixtral-fused"),
    pytest.param("gpt_oss", write_mxfp4_layout, id="gpt_oss-mxfp4"),
]


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _uniform_keep(arch, config) -> dict[int, list[int]]:
    # same count everywhere, different ids per layer; for group routing 2 per group of 4
    keeps = ([1, 3, 4, 6], [0, 2, 5, 7], [1, 2, 4, 7])
    return {layer_idx: keeps[i % 3] for i, layer_idx in enumerate(arch.moe_layers(config))}


def _nonuniform_keep(arch, config) -> dict[int, list[int]]:
    if arch.routing_kind == "sigmoid_group":  # equal per group of 4, >= 2 per group
        keeps = ([0, 1, 2, 4, 5, 6], [0, 3, 4, 7])
    else:
        keeps = ([0, 1, 2, 5, 6, 7], [2, 5])
    return {layer_idx: keeps[i % 2] for i, layer_idx in enumerate(arch.moe_layers(config))}


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """One tiny parent per variant, built once (tests never modify them)."""
    built: dict = {}

    def get(family: str, rewrite) -> Path:
        key = (family, rewrite.__name__ if rewrite else None)
        if key not in built:
            path = build_tiny(family, tmp_path_factory.mktemp(f"{family}-parent"))
            if rewrite:
                rewrite(path)
            built[key] = path
        return built[key]

    return get


def _load_kwargs(model_dir: Path) -> dict:
    kwargs = {"dtype": torch.float32}
    if _config(model_dir).get("quantization_config", {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)  # CPU: no MXFP4 kernels
    return kwargs


def _load(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, **_load_kwargs(model_dir)).eval()


def _inputs() -> torch.Tensor:
    return torch.randint(8, 60, (2, 11), generator=torch.Generator().manual_seed(7))


def _tensor(path: Path, name: str) -> torch.Tensor:
    files = [path / "model.safetensors"] if (path / "model.safetensors").exists() else sorted(path.glob("model-*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name)
    raise KeyError(name)


def _assert_kept_bits(arch, parent_dir: Path, out_dir: Path, keep: dict[int, list[int]]) -> None:
    """Every kept expert (and router row) is bit-identical to the parent's slice."""
    config = _config(parent_dir)
    out_names = set()
    for file in out_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            out_names |= set(fh.keys())
    for layer_idx, kept in keep.items():
        for name in arch.router_tensor_names(layer_idx):
            if name in out_names:
                assert torch.equal(_tensor(out_dir, name), _tensor(parent_dir, name)[kept])
        fused = {role: name for role, name in arch.fused_expert_names(layer_idx).items() if name in out_names}
        if fused:
            for name in fused.values():
                pruned, parent = _tensor(out_dir, name), _tensor(parent_dir, name)
                assert pruned.shape[0] == len(kept)
                assert pruned.dtype == parent.dtype
                assert torch.equal(pruned, parent[kept])
        else:
            for new_idx, old_idx in enumerate(kept):
                new_names = arch.expert_tensor_names(layer_idx, new_idx)
                old_names = arch.expert_tensor_names(layer_idx, old_idx)
                for role in new_names:
                    assert torch.equal(_tensor(out_dir, new_names[role]), _tensor(parent_dir, old_names[role]))
            n_parent = arch.n_experts(config, layer_idx)
            for gone in range(len(kept), n_parent):  # no stale expert keys past the new count
                assert not set(arch.expert_tensor_names(layer_idx, gone).values()) & out_names


@pytest.mark.parametrize("family,rewrite", VARIANTS)
@pytest.mark.parametrize("allocation", ["uniform", "nonuniform"])
def test_pruned_equals_masked_parent(parents, tmp_path, family, rewrite, allocation):
    parent_dir = parents(family, rewrite)
    config = _config(parent_dir)
    arch = load_arch(config)
    keep = (_uniform_keep if allocation == "uniform" else _nonuniform_keep)(arch, config)
    plan = Plan(model_fingerprint(parent_dir), keep, {"ranker": "test", "allocation": allocation})
    out_dir = prune_checkpoint(parent_dir, plan, tmp_path / "pruned")

    out_config = _config(out_dir)
    counts = sorted({len(ids) for ids in keep.values()})
    for key in arch.n_experts_keys:
        assert out_config[key] == counts[-1]
    if allocation == "uniform":
        assert PER_LAYER_COUNTS_KEY not in out_config
        pruned = _load(out_dir)  # stock transformers loads uniform pruned checkpoints
    else:
        expected = [len(keep.get(i, [])) for i in range(config["num_hidden_layers"])]
        assert out_config[PER_LAYER_COUNTS_KEY] == expected
        with pytest.raises(Exception, match="mismatch|size"):
            _load(out_dir)  # never random-initialise missing experts
        pruned = load_pruned(out_dir, **_load_kwargs(out_dir)).eval()
    for layer_idx, ids in keep.items():
        assert pruned.get_submodule(arch.router_module(layer_idx)).weight.shape[0] == len(ids)

    parent = _load(parent_dir)
    x = _inputs()
    with torch.no_grad():
        unmasked = parent(x).logits
        with expert_mask(parent, keep):
            masked = parent(x).logits
        pruned_logits = pruned(x).logits
    assert (pruned_logits - masked).abs().max().item() <= TOLERANCE
    # the comparison can fail: dropping experts changes the parent's output a lot
    assert (masked - unmasked).abs().max().item() > 1e-2

    _assert_kept_bits(arch, parent_dir, out_dir, keep)
    generated = pruned.generate(x[:, :4], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape == (2, 8)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_keep_all_is_bit_identical(parents, tmp_path, family):
    parent_dir = parents(family, None)
    config = _config(parent_dir)
    arch = load_arch(config)
    n_experts = arch.n_experts(config)
    keep = {layer_idx: list(range(n_experts)) for layer_idx in arch.moe_layers(config)}
    out_dir = prune_checkpoint(parent_dir, Plan(model_fingerprint(parent_dir), keep), tmp_path / "all")
    with safe_open(str(parent_dir / "model.safetensors"), "pt") as a, safe_open(str(out_dir / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    assert model_fingerprint(out_dir) == model_fingerprint(parent_dir)


def test_output_side_files_provenance_and_fingerprint(parents, tmp_path):
    parent_dir = parents("qwen3_moe", None)
    config = _config(parent_dir)
    arch = load_arch(config)
    keep = _uniform_keep(arch, config)
    plan = Plan(model_fingerprint(parent_dir), keep, {"ranker": "mass", "drop_ratio": 0.5, "languages": ["de"]})
    plan_path = plan.save(tmp_path / "plan.json")
    out_dir = prune_checkpoint(parent_dir, Plan.load(plan_path), tmp_path / "pruned")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out_dir / name).read_bytes() == (parent_dir / name).read_bytes()
    provenance = json.loads((out_dir / PROVENANCE_NAME).read_text())
    assert provenance["parent_fingerprint"] == model_fingerprint(parent_dir)
    assert provenance["model_fingerprint"] == model_fingerprint(out_dir)
    assert provenance["plan"]["sha256"] == Plan.load(plan_path).sha256()
    assert provenance["plan"]["meta"]["languages"] == ["de"]
    assert provenance["keep"] == {str(k): v for k, v in keep.items()}
    from packager.core.fingerprint import file_sha256

    assert provenance["input"]["hash_mode"] == "full"
    assert provenance["input"]["files"]["model.safetensors"]["sha256"] == file_sha256(parent_dir / "model.safetensors")
    assert provenance["versions"]["packager"]
    # a second prune of the pruned model validates against the pruned fingerprint
    second = {layer_idx: [0, 1] for layer_idx in keep}
    out2 = prune_checkpoint(out_dir, Plan(provenance["model_fingerprint"], second), tmp_path / "pruned2")
    for layer_idx, ids in keep.items():
        assert torch.equal(_tensor(out2, arch.router_weight_name(layer_idx)),
                           _tensor(parent_dir, arch.router_weight_name(layer_idx))[ids[:2]])


def test_sharded_input_and_output(parents, tmp_path):
    parent_dir = build_tiny("qwen3_moe", tmp_path / "sharded-parent", max_shard_size="40KB")
    assert (parent_dir / INDEX_NAME).exists()
    config = _config(parent_dir)
    arch = load_arch(config)
    keep = _nonuniform_keep(arch, config)
    plan = Plan(model_fingerprint(parent_dir), keep)
    max_shard_bytes = 20_000
    out_dir = prune_checkpoint(parent_dir, plan, tmp_path / "pruned", max_shard_bytes=max_shard_bytes)
    index = json.loads((out_dir / INDEX_NAME).read_text())
    shards = sorted(out_dir.glob("model-*.safetensors"))
    assert len(shards) > 3
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    total = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as fh:
            sizes = [fh.get_tensor(n).numel() * fh.get_tensor(n).element_size() for n in fh.keys()]
            assert all(index["weight_map"][n] == shard.name for n in fh.keys())
        assert sum(sizes) <= max_shard_bytes or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    parent = _load(parent_dir)
    pruned = load_pruned(out_dir, dtype=torch.float32).eval()
    x = _inputs()
    with torch.no_grad(), expert_mask(parent, keep):
        masked = parent(x).logits
    with torch.no_grad():
        assert (pruned(x).logits - masked).abs().max().item() <= TOLERANCE
    _assert_kept_bits(arch, parent_dir, out_dir, keep)


def test_failure_midway_leaves_nothing(parents, tmp_path, monkeypatch):
    import packager.core.checkpoint as checkpoint

    parent_dir = parents("qwen3_moe", None)
    config = _config(parent_dir)
    keep = _uniform_keep(load_arch(config), config)
    calls = {"n": 0}
    real_copy = checkpoint.copy_range

    def failing_copy(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real_copy(*args)

    monkeypatch.setattr(checkpoint, "copy_range", failing_copy)
    with pytest.raises(OSError, match=r"pruned: no space left on device .*; nothing was written$"):  # one line
        prune_checkpoint(parent_dir, Plan(model_fingerprint(parent_dir), keep), tmp_path / "pruned", max_shard_bytes=10_000)
    assert calls["n"] == 5
    assert os.listdir(tmp_path) == []


_KILL_RUNNER = """
import sys, time, pathlib
import packager.core.checkpoint as checkpoint
from packager.core.plan_file import Plan
from packager.prune import prune_checkpoint
real = checkpoint.copy_range
state = {"n": 0}
def slow_copy(*args):
    state["n"] += 1
    if state["n"] == 3:
        pathlib.Path(sys.argv[3]).write_text("hanging")
        time.sleep(600)
    return real(*args)
checkpoint.copy_range = slow_copy
prune_checkpoint(sys.argv[1], Plan.load(sys.argv[2]), sys.argv[4], max_shard_bytes=10_000)
"""


def test_kill_midway_leaves_no_output(parents, tmp_path):
    parent_dir = parents("qwen3_moe", None)
    config = _config(parent_dir)
    keep = _uniform_keep(load_arch(config), config)
    plan_path = Plan(model_fingerprint(parent_dir), keep).save(tmp_path / "plan.json")
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _KILL_RUNNER, str(parent_dir), str(plan_path), str(marker),
                              str(out_root / "pruned")])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "runner exited before it reached the copy"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        partials = [p.name for p in out_root.iterdir()]
        assert len(partials) == 1 and partials[0].startswith(".pruned.partial-")
    finally:
        child.kill()
        child.wait()
    assert not (out_root / "pruned").exists()
    # the next run removes the dead run's staging directory and succeeds
    prune_checkpoint(parent_dir, Plan.load(plan_path), out_root / "pruned")
    assert [p.name for p in out_root.iterdir()] == ["pruned"]


def test_nonuniform_tied_embeddings_save_and_reload(tmp_path):
    """A non-uniform model loaded with load_pruned can be saved (e.g. after distillation) and reloaded."""
    parent_dir = build_tiny("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True, num_hidden_layers=3)
    keep = {0: [0, 1, 2, 3, 4, 5], 1: [2, 6], 2: [1, 3, 5, 7]}
    out_dir = prune_checkpoint(parent_dir, Plan(model_fingerprint(parent_dir), keep), tmp_path / "pruned")
    pruned = load_pruned(out_dir, dtype=torch.float32).eval()
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    parent = _load(parent_dir)
    x = _inputs()
    with torch.no_grad(), expert_mask(parent, keep):
        masked = parent(x).logits
    with torch.no_grad():
        logits = pruned(x).logits
    assert (logits - masked).abs().max().item() <= TOLERANCE
    pruned.save_pretrained(tmp_path / "resaved")
    assert _config(tmp_path / "resaved")[PER_LAYER_COUNTS_KEY] == [6, 2, 4]
    assert model_fingerprint(tmp_path / "resaved") == model_fingerprint(out_dir)
    again = load_pruned(tmp_path / "resaved", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, logits)
