"""Mask mode: dropped experts never run, removal restores the model, bad masks are refused."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import FAMILIES, build_tiny
from transformers import AutoModelForCausalLM

from packager.core.arch import load_arch
from packager.core.errors import PlanError
from packager.masking import apply_expert_mask, expert_mask


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            path = build_tiny(family, tmp_path_factory.mktemp(family))
            config = json.loads((path / "config.json").read_text())
            built[family] = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_arch(config), config)
        return built[family]

    return get


X = torch.randint(8, 60, (2, 9), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_routes_only_kept_experts_and_restores(models, family):
    model, arch, config = models(family)
    layers = arch.moe_layers(config)
    keep = {layers[0]: [0, 1, 4, 5], layers[1]: [2, 3, 6, 7]}
    chosen: dict[int, torch.Tensor] = {}

    def recorder(layer_idx):
        def hook(module, args, output):
            chosen[layer_idx] = output[2]
        return hook

    with torch.no_grad():
        before = model(X).logits
        # keeping every expert reproduces the unmasked model: the reference routing is exact
        with expert_mask(model, {layer_idx: list(range(8)) for layer_idx in layers}):
            assert (model(X).logits - before).abs().max().item() <= 1e-5
        handle = apply_expert_mask(model, keep)
        # recorders registered after the mask hooks see the masked routing
        recorders = [model.get_submodule(arch.router_module(i)).register_forward_hook(recorder(i)) for i in layers]
        masked = model(X).logits
        for recorder_handle in recorders:
            recorder_handle.remove()
        handle.remove()
        after = model(X).logits
    for layer_idx, ids in keep.items():
        assert set(chosen[layer_idx].unique().tolist()) <= set(ids)
        assert chosen[layer_idx].shape == (X.numel(), 2)
    assert (masked - before).abs().max().item() > 1e-2
    assert torch.equal(after, before)


def test_mask_one_layer_only(models):
    model, arch, config = models("olmoe")
    with torch.no_grad():
        before = model(X).logits
        with expert_mask(model, {1: [0, 1]}):
            last_only = model(X).logits
        with expert_mask(model, {0: [0, 1], 1: [0, 1]}):
            both = model(X).logits
    assert not torch.allclose(last_only, before) and not torch.allclose(both, last_only)


@pytest.mark.parametrize("keep,message", [
    ({0: [0]}, "at least top-k=2"),
    ({0: [0, 0]}, "at least top-k=2"),
    ({0: [0, 8]}, "0..7"),
    ({5: [0, 1]}, "layer 5 is not an MoE layer"),
])
def test_bad_masks_are_refused_and_leave_no_hooks(models, keep, message):
    model, arch, config = models("qwen3_moe")
    with torch.no_grad():
        before = model(X).logits
    with pytest.raises(PlanError, match=message):
        apply_expert_mask(model, {1: [0, 1], **keep})
    with torch.no_grad():
        assert torch.equal(model(X).logits, before)
