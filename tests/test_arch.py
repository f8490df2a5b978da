"""Architecture adapters: loading, layer rules, tensor names against real transformers
checkpoints, reference routing against the transformers routers, fingerprint and plan file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, build_tiny, tiny_config
from transformers import AutoModelForCausalLM

from packager.core.arch import PER_LAYER_COUNTS_KEY, UnsupportedArchitecture, load_arch, supported_families
from packager.core.arch.spec import _parse
from packager.core.errors import PackagerError, PlanError
from packager.core.fingerprint import fingerprint_from_parts, model_fingerprint
from packager.core.plan_file import Plan, validate_plan


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, tmp_path_factory.mktemp(family))
        return built[family]

    return get


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_supported_families_and_unknown_type():
    assert supported_families() == sorted(FAMILIES)
    with pytest.raises(UnsupportedArchitecture) as err:
        load_arch({"model_type": "llama"})
    assert isinstance(err.value, PackagerError)
    assert "'llama'" in str(err.value)
    for family in FAMILIES:
        assert family in str(err.value)


def test_architecture_file_validation():
    good = {"family": "x", "model_types": ["x"], "config": {"n_experts_keys": ["n"], "top_k_key": "k"},
            "routing": {"kind": "softmax_topk"}, "tensors": {"router_weight": "r", "per_expert": {"gate": "g"}},
            "layouts": {"per_expert": ["gate"]}, "modules": {"router": "a", "experts": "b", "moe_block": "c"}}
    assert _parse(good, "x.json").family == "x"
    with pytest.raises(ValueError, match="routing.kind"):
        _parse({**good, "routing": {"kind": "magic"}}, "x.json")
    with pytest.raises(ValueError, match="role 'up' has no template"):
        _parse({**good, "layouts": {"per_expert": ["gate", "up"]}}, "x.json")
    with pytest.raises(ValueError, match="unknown fields"):
        _parse({**good, "tensor_names": {}}, "x.json")


@pytest.mark.parametrize("family", FAMILIES)
def test_names_cover_the_saved_checkpoint(checkpoints, family):
    """Every router/expert/shared name the adapter gives exists on disk; classification is complete."""
    model_dir = checkpoints(family)
    config = _config(model_dir)
    arch = load_arch(config)
    assert arch.family == family
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    n_experts, top_k = arch.n_experts(config), arch.top_k(config)
    assert (n_experts, top_k) == (8, 2)
    moe_layers = arch.moe_layers(config)
    assert moe_layers == ([1, 2] if family == "deepseek_v3" else [0, 1])
    classified = set()
    for layer_idx in moe_layers:
        layout = arch.detect_layout(layer_idx, n_experts, names)
        assert layout == ("fused" if family == "gpt_oss" else "per_expert")
        expert_names = arch.layout_tensor_names(layout, layer_idx, n_experts)
        assert set(expert_names) <= names
        classified |= set(expert_names)
        for name in arch.router_tensor_names(layer_idx) + arch.shared_expert_names(layer_idx):
            assert name in names
            classified.add(name)
        with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
            assert fh.get_slice(arch.router_weight_name(layer_idx)).get_shape() == [8, 32]
    assert (arch.router_bias_name(0) is not None) == (family == "gpt_oss")
    assert (arch.score_bias_name(1) is not None) == (family == "deepseek_v3")
    assert bool(arch.shared_expert_names(1)) == (family in ("qwen2_moe", "deepseek_v3"))
    # nothing expert-like is left unclassified
    leftovers = [n for n in names - classified if ".experts." in n or ".gate.weight" in n or "router" in n]
    assert leftovers == []
    # module paths resolve in the transformers model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer_idx in moe_layers:
        assert model.get_submodule(arch.router_module(layer_idx)).weight.shape == (8, 32)
        assert model.get_submodule(arch.experts_module(layer_idx)).gate_up_proj.shape[0] == 8


def test_dense_layer_rules():
    qwen = tiny_config("qwen3_moe", num_hidden_layers=6, mlp_only_layers=[0], decoder_sparse_step=2).to_dict()
    assert load_arch(qwen).moe_layers(qwen) == [1, 3, 5]
    qwen = tiny_config("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[0, 3]).to_dict()
    assert load_arch(qwen).moe_layers(qwen) == [1, 2]
    deepseek = tiny_config("deepseek_v3", num_hidden_layers=5, first_k_dense_replace=2).to_dict()
    assert load_arch(deepseek).moe_layers(deepseek) == [2, 3, 4]
    mixtral = tiny_config("mixtral", num_hidden_layers=3).to_dict()
    assert load_arch(mixtral).moe_layers(mixtral) == [0, 1, 2]


def test_per_layer_counts_and_config_updates():
    config = tiny_config("qwen3_moe", num_hidden_layers=3).to_dict()
    arch = load_arch(config)
    assert arch.n_experts(config, 1) == 8 and arch.is_uniform(config)
    updates = arch.config_updates_for_counts(config, {0: 6, 1: 2, 2: 4})
    assert updates == {"num_experts": 6, "num_local_experts": 6, PER_LAYER_COUNTS_KEY: [6, 2, 4]}
    pruned = {**config, **updates}
    assert [arch.n_experts(pruned, i) for i in range(3)] == [6, 2, 4]
    assert arch.n_experts(pruned) == 6 and not arch.is_uniform(pruned)
    assert arch.config_updates_for_counts(config, {0: 4, 1: 4, 2: 4}) == {
        "num_experts": 4, "num_local_experts": 4, PER_LAYER_COUNTS_KEY: None}
    deepseek = tiny_config("deepseek_v3").to_dict()
    assert load_arch(deepseek).config_updates_for_counts(deepseek, {1: 4, 2: 4}) == {
        "n_routed_experts": 4, PER_LAYER_COUNTS_KEY: None}


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_routing_matches_transformers_router(checkpoints, family):
    model_dir = checkpoints(family)
    config = _config(model_dir)
    arch = load_arch(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layer_idx = arch.moe_layers(config)[-1]
    router = model.get_submodule(arch.router_module(layer_idx))
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    bias_name = arch.score_bias_name(layer_idx)
    bias = getattr(router, bias_name.rsplit(".", 1)[-1]) if bias_name else None
    if bias is not None:
        assert bias.abs().max() > 0  # the tiny model has a real correction bias to reproduce
    with torch.no_grad():
        logits, weights, idx = router(hidden)
        ref_idx, ref_weights = arch.route(logits, config, bias=bias)
    order, ref_order = idx.sort(dim=-1), ref_idx.sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)
    assert torch.allclose(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices), atol=1e-6, rtol=0)
    # with a mask, dropped experts are never chosen and the kept choice is still top-k
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[[0, 1, 4, 5]] = True  # two per group of 4 for group routing
    masked_idx, masked_weights = arch.route(logits, config, bias=bias, allowed=allowed)
    assert masked_idx.shape == (64, 2)
    assert allowed[masked_idx].all()
    assert torch.isfinite(masked_weights).all()
    changed = (masked_idx.sort(dim=-1).values != ref_order.values).any(dim=-1)
    assert changed.any()  # the mask is not vacuous on this input


def test_fingerprint_is_router_content(checkpoints, tmp_path):
    model_dir = checkpoints("qwen3_moe")
    config = _config(model_dir)
    arch = load_arch(config)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        routers = [fh.get_tensor(arch.router_weight_name(i)).numpy() for i in arch.moe_layers(config)]
        tensors = {n: fh.get_tensor(n) for n in fh.keys()}
    fp = model_fingerprint(model_dir)
    assert len(fp) == 64
    assert fp == fingerprint_from_parts("qwen3_moe", [0, 1], [8, 8], 2, routers)
    # bf16 copy of the same fp32 values -> same bytes once widened; fp16 routers too if exactly representable
    assert fp == fingerprint_from_parts("qwen3_moe", [0, 1], [8, 8], 2, [r.astype(np.float64) for r in routers])
    assert fp != fingerprint_from_parts("qwen3_moe", [0, 1], [8, 8], 3, routers)
    from safetensors.torch import save_file

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((model_dir / "config.json").read_text())
    other = dict(tensors)
    other["model.embed_tokens.weight"] = other["model.embed_tokens.weight"] + 1
    save_file(other, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(copy) == fp  # non-router weights do not matter
    other[arch.router_weight_name(1)] = other[arch.router_weight_name(1)].clone()
    other[arch.router_weight_name(1)][3, 5] += 1e-3
    save_file(other, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(copy) != fp
    other[arch.router_weight_name(1)] = tensors[arch.router_weight_name(1)].to(torch.bfloat16)
    save_file(other, str(copy / "model.safetensors"), metadata={"format": "pt"})
    bf16 = [routers[0], tensors[arch.router_weight_name(1)].to(torch.bfloat16).float().numpy()]
    assert model_fingerprint(copy) == fingerprint_from_parts("qwen3_moe", [0, 1], [8, 8], 2, bf16)


def test_plan_roundtrip_and_validation(tmp_path):
    config = tiny_config("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1]).to_dict()
    arch = load_arch(config)
    plan = Plan("ab" * 32, {2: [7, 1, 3], 0: [0, 5]}, {"ranker": "mass", "languages": ["de", "fr"]})
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["keep"] == {"0": [0, 5], "2": [1, 3, 7]} and data["format"] == "edge-packager-plan"
    loaded = Plan.load(path)
    assert loaded.keep == {0: [0, 5], 2: [1, 3, 7]} and loaded.meta == plan.meta
    assert loaded.sha256() == plan.sha256()
    validate_plan(loaded, arch, config, "ab" * 32)
    with pytest.raises(PlanError, match="layer 1 is a dense layer"):
        validate_plan(Plan("ab" * 32, {0: [0, 1], 1: [0, 1], 2: [0, 1]}), arch, config, "ab" * 32)
    with pytest.raises(PlanError, match=r"plan.json: plan was made for model abab"):
        validate_plan(loaded, arch, config, "cd" * 32)
    with pytest.raises(PlanError, match="meta asks to prune shared experts"):
        validate_plan(Plan("ab" * 32, {0: [0, 1], 2: [0, 1]}, {"prune_shared": True}), arch, config, "ab" * 32)
    for bad, message in [({"keep": {"0": [1]}}, "missing 'model_fingerprint'"),
                         ({"model_fingerprint": "x", "keep": {"zero": [1]}}, "'zero' is not a decoder layer index"),
                         ({"model_fingerprint": "x", "keep": {"0": [1.5]}}, "1.5 is not an integer"),
                         ({"model_fingerprint": "x", "keep": {"0": [1]}, "version": 9}, "version 9 is not supported")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(PlanError, match=message):
            Plan.load(path)
