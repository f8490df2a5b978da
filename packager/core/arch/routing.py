"""Torch reference routing for each routing kind, with an `allowed` mask of experts.

A pruned model routes exactly like its parent with the dropped experts excluded here:
masked logits are -inf before the softmax (softmax_topk, topk_softmax), and for
sigmoid_group the biased selection score is -inf (the weights come from the unbiased
sigmoid, which never sees dropped experts because they are never selected)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from packager.core.arch.spec import RoutingSettings


def _masked(values: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    if allowed is None:
        return values
    allowed = allowed.to(device=values.device, dtype=torch.bool)
    return values.masked_fill(~allowed, float("-inf"))


def _softmax_topk(settings: RoutingSettings, logits: torch.Tensor, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(_masked(logits, allowed).float(), dim=-1)
    weights, idx = torch.topk(probs, settings.top_k, dim=-1)
    if settings.renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return idx, weights.to(logits.dtype)


def _topk_softmax(settings: RoutingSettings, logits: torch.Tensor, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    values, idx = torch.topk(_masked(logits, allowed), settings.top_k, dim=-1)
    return idx, torch.softmax(values, dim=-1, dtype=values.dtype)


def _sigmoid_group(settings: RoutingSettings, logits: torch.Tensor, bias, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    n_group, topk_group, top_k = settings.n_group, settings.topk_group, settings.top_k
    n_experts = logits.shape[-1]
    if n_experts % n_group:
        raise ValueError(f"{n_experts} experts do not split into {n_group} equal groups")
    scores = logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.to(scores.device, torch.float32)
    choice = _masked(choice, allowed)
    flat = choice.reshape(-1, n_experts)
    group_size = n_experts // n_group
    group_scores = flat.view(-1, n_group, group_size).topk(settings.group_score_top, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, n_group, group_size).reshape(-1, n_experts)
    flat = flat.masked_fill(~expert_mask.bool(), float("-inf"))
    idx = torch.topk(flat, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.reshape(-1, n_experts).gather(1, idx)
    if settings.renorm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * settings.scaling
    shape = logits.shape[:-1] + (top_k,)
    return idx.reshape(shape), weights.reshape(shape)


def route(settings: RoutingSettings, router_logits: torch.Tensor, bias=None, allowed=None):
    """(topk_idx, topk_weight) for router logits [..., n_experts] (router bias already added).

    `settings` are the layer's routing (`MoEArch.routing_settings`, resolved once by callers
    that route on every forward pass). `bias` is the score-correction bias of sigmoid_group
    routers; `allowed` is a bool tensor [n_experts]: experts where it is False are never chosen."""
    kind = settings.kind
    if kind == "softmax_topk":
        return _softmax_topk(settings, router_logits, allowed)
    if kind == "topk_softmax":
        return _topk_softmax(settings, router_logits, allowed)
    if kind == "sigmoid_group":
        return _sigmoid_group(settings, router_logits, bias, allowed)
    raise ValueError(f"unknown routing kind {kind!r}")
