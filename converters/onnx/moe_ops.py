"""The routed-expert block in three exportable formulations (all exact top-k routing).

- "contrib": ONNX Runtime's `com.microsoft` MoE operator. The op does softmax, top-k and the
  optional top-k renormalisation itself, from raw router logits, and runs only the chosen
  experts. Gate and up rows are interleaved (swiglu_fusion=1); the Hugging Face layout (gate
  block, then up block) is rejected by the op.
- "sparse": standard ONNX only. A static loop over the experts; each expert gathers the tokens
  that chose it (NonZero), runs its MLP with constant 2D weights and scatter-adds the result.
  Loads in any ONNX Runtime build and onnxruntime's quantizers see the expert MatMuls.
- "dense": standard ONNX, every expert on every token, weighted by the (mostly zero) routing
  weights. Exact but does num_experts / top_k times the work: a measurement baseline.

The torch bodies are reference implementations: the exporter sees the custom op for
"contrib" (translated by `_moe_symbolic`) and the plain torch ops for the others.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from converters.onnx.options import FORMULATIONS

logger = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"
_OP_NAMESPACE = "edge_packager"


def softmax_topk(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE routing: softmax over the layer's experts, top-k, optional renormalisation."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


@torch.library.custom_op(f"{_OP_NAMESPACE}::moe_swiglu", mutates_args=())
def moe_swiglu(hidden: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
               top_k: int, normalize: bool) -> torch.Tensor:
    """hidden [T, H], router_logits [T, E], fc1 [E, 2I, H] (gate/up rows interleaved), fc2 [E, H, I]."""
    weights, indices = softmax_topk(router_logits, top_k, normalize)
    out = torch.zeros_like(hidden)
    for expert_idx in range(fc1.shape[0]):
        chosen = (indices == expert_idx)
        if not bool(chosen.any()):
            continue
        rows = chosen.any(dim=-1).nonzero().squeeze(-1)
        projected = hidden[rows] @ fc1[expert_idx].T
        act = nn.functional.silu(projected[:, 0::2]) * projected[:, 1::2]
        weight = (weights * chosen).sum(dim=-1)[rows, None].to(hidden.dtype)
        out.index_add_(0, rows, (act @ fc2[expert_idx].T) * weight)
    return out


@moe_swiglu.register_fake
def _moe_swiglu_fake(hidden, router_logits, fc1, fc2, top_k, normalize):
    return torch.empty_like(hidden)


def _moe_symbolic(g, hidden, router_logits, fc1, fc2, top_k, normalize):
    """TorchScript-exporter translation of `moe_swiglu` into the contrib operator."""
    from torch.onnx import symbolic_helper

    k = symbolic_helper._maybe_get_const(top_k, "i")
    renorm = symbolic_helper._maybe_get_const(normalize, "b")
    no_bias = symbolic_helper._optional_input_placeholder_tensor(g)
    return g.op(
        f"{CONTRIB_DOMAIN}::MoE", hidden, router_logits, fc1, no_bias, fc2,
        k_i=int(k), activation_type_s="swiglu", swiglu_fusion_i=1, normalize_routing_weights_i=int(bool(renorm)),
        activation_alpha_f=1.0, activation_beta_f=0.0,
    ).setType(hidden.type())


def register_symbolic() -> None:
    """Teach the TorchScript exporter our custom op (idempotent: a re-registration replaces it)."""
    torch.onnx.register_custom_op_symbolic(f"{_OP_NAMESPACE}::moe_swiglu", _moe_symbolic, 1)


def interleave_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """[E, 2I, H] with the gate block then the up block -> rows gate0, up0, gate1, up1, ..."""
    n_experts, double, hidden = gate_up.shape
    gate, up = gate_up[:, : double // 2], gate_up[:, double // 2:]
    return torch.stack([gate, up], dim=2).reshape(n_experts, double, hidden).contiguous()


class RoutedExperts(nn.Module):
    """One MoE layer: router [E, H] plus SwiGLU experts, in one of FORMULATIONS.

    Weights are stored [in, out] (`x @ w`) so that each exported MatMul reads a named
    initializer directly, which the quantizers can find by name."""

    def __init__(self, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                 top_k: int, normalize: bool, formulation: str):
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"unknown MoE formulation {formulation!r}; choose from {FORMULATIONS}")
        self.formulation = formulation
        self.n_experts = router_weight.shape[0]
        self.top_k = top_k
        self.normalize = normalize
        self.router = nn.Parameter(router_weight.detach().T.contiguous().float(), requires_grad=False)
        inter = gate_up.shape[1] // 2
        if formulation == "contrib":
            self.fc1 = nn.Parameter(interleave_gate_up(gate_up.detach().float()), requires_grad=False)
            self.fc2 = nn.Parameter(down.detach().float().contiguous(), requires_grad=False)
        else:
            # one [H, I] / [I, H] constant per expert: plain MatMuls that quantizers can see
            self.gate = nn.ParameterList(
                [nn.Parameter(gate_up[e, :inter].detach().T.contiguous().float(), requires_grad=False) for e in range(self.n_experts)])
            self.up = nn.ParameterList(
                [nn.Parameter(gate_up[e, inter:].detach().T.contiguous().float(), requires_grad=False) for e in range(self.n_experts)])
            self.down = nn.ParameterList(
                [nn.Parameter(down[e].detach().T.contiguous().float(), requires_grad=False) for e in range(self.n_experts)])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> [T, H]."""
        router_logits = hidden @ self.router
        if self.formulation == "contrib":
            return torch.ops.edge_packager.moe_swiglu(hidden, router_logits, self.fc1, self.fc2, self.top_k, self.normalize)
        weights, indices = softmax_topk(router_logits, self.top_k, self.normalize)
        weights = weights.to(hidden.dtype)
        out = torch.zeros_like(hidden)
        for expert_idx in range(self.n_experts):
            chosen = (indices == expert_idx)
            expert_weight = (weights * chosen).sum(dim=-1)  # [T], zero where not chosen
            if self.formulation == "dense":
                rows_hidden, rows_weight = hidden, expert_weight
            else:
                rows = chosen.any(dim=-1).nonzero().squeeze(-1)
                rows_hidden, rows_weight = hidden.index_select(0, rows), expert_weight.index_select(0, rows)
            act = nn.functional.silu(rows_hidden @ self.gate[expert_idx]) * (rows_hidden @ self.up[expert_idx])
            result = (act @ self.down[expert_idx]) * rows_weight[:, None]
            if self.formulation == "dense":
                out = out + result
            else:
                out = out.index_add(0, rows, result)
        return out
