"""Mask mode: run a loaded transformers MoE model as if the dropped experts were pruned.

A forward hook on each router replaces its routing with the family's reference routing
(`MoEArch.route`) restricted to the kept experts, i.e. the dropped experts' router logits
(or, for sigmoid/group routers, their biased selection scores) are -inf. No file is
written; `handle.remove()` restores the model. Used by tests and quality sweeps."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from packager.core.arch import load_arch
from packager.core.errors import PlanError

logger = logging.getLogger(__name__)


class ExpertMaskHandle:
    """Removable set of router hooks."""

    def __init__(self, hooks: list):
        self._hooks = hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> ExpertMaskHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _router_hook(arch, config, allowed: torch.Tensor, bias_attr: str | None, routing):
    def hook(module, args, output):
        router_logits, old_weights, _old_idx = output
        bias = getattr(module, bias_attr) if bias_attr else None
        mask = allowed.to(router_logits.device)
        idx, weights = arch.route(router_logits, config, bias=bias, allowed=mask, settings=routing)
        masked_logits = router_logits.masked_fill(~mask, float("-inf"))
        return masked_logits, weights.to(old_weights.dtype), idx.to(_old_idx.dtype)

    return hook


def apply_expert_mask(model: torch.nn.Module, keep: Mapping[int, list[int]]) -> ExpertMaskHandle:
    """Restrict each listed MoE layer of `model` to the experts in `keep[layer_idx]`.

    Layers absent from `keep` route as usual. Raises PlanError for layers that are not MoE
    layers, ids out of range or fewer kept experts than top-k."""
    config = model.config
    arch = load_arch(config)
    moe_layers = set(arch.moe_layers(config))
    score_bias_attr = arch.score_bias_name(0).rsplit(".", 1)[-1] if arch.score_bias_name(0) else None
    hooks = []
    try:
        for layer_idx, ids in sorted(keep.items()):
            if layer_idx not in moe_layers:
                raise PlanError(f"mask: layer {layer_idx} is not an MoE layer of this model ({sorted(moe_layers)})")
            router = model.get_submodule(arch.router_module(layer_idx))
            n_experts = router.weight.shape[0]
            routing = arch.routing_settings(config, layer_idx)  # resolved once: the hook runs on every forward pass
            top_k = routing.top_k
            if len(set(ids)) < top_k or any(not 0 <= e < n_experts for e in ids):
                raise PlanError(
                    f"mask: layer {layer_idx} keeps {sorted(ids)}; need at least top-k={top_k} distinct ids in 0..{n_experts - 1}"
                )
            allowed = torch.zeros(n_experts, dtype=torch.bool)
            allowed[list(ids)] = True
            hooks.append(router.register_forward_hook(_router_hook(arch, config, allowed, score_bias_attr, routing)))
    except BaseException:
        for hook in hooks:
            hook.remove()
        raise
    return ExpertMaskHandle(hooks)


@contextmanager
def expert_mask(model: torch.nn.Module, keep: Mapping[int, list[int]]) -> Iterator[ExpertMaskHandle]:
    handle = apply_expert_mask(model, keep)
    try:
        yield handle
    finally:
        handle.remove()
