"""An export-friendly torch re-statement of a Qwen3-MoE decoder, built from a loaded
transformers model (parent, uniform or non-uniform pruned: each layer keeps its own expert
count, read from its tensors).

Why not trace the transformers model: its experts loop is data-dependent (the TorchScript
exporter freezes the example's routing, dynamo refuses it), grouped_mm does not export, and
its cache and mask helpers change between versions. This module has no data-dependent Python
control flow, takes the KV cache as flat tensors and returns the updated ones; parity with
transformers is tested, not assumed.

Graph signature (names from runtime.backends.onnx_backend, the one place for them):
  input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
  past_key_values.{i}.key / .value [B, n_kv_heads, P, head_dim] float32
  -> logits [B, S, V] float32, present.{i}.key / .value [B, n_kv_heads, P+S, head_dim].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from converters.onnx.errors import OnnxExportError
from converters.onnx.moe_ops import RoutedExperts
from converters.onnx.options import SUPPORTED_FAMILIES

logger = logging.getLogger(__name__)

ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class GraphShape:
    """What the runtime needs to know to feed the graph."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    n_experts: dict[int, int]  # MoE layer index -> experts kept in that layer
    top_k: int


def _frozen(tensor: torch.Tensor, transpose: bool = False) -> nn.Parameter:
    data = tensor.detach().float()
    return nn.Parameter((data.T if transpose else data).contiguous(), requires_grad=False)


def _optional(linear: nn.Linear) -> nn.Parameter | None:
    return _frozen(linear.bias) if linear.bias is not None else None


class RMSNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = _frozen(norm.weight)
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, attn: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_weight, self.q_bias = _frozen(attn.q_proj.weight, True), _optional(attn.q_proj)
        self.k_weight, self.k_bias = _frozen(attn.k_proj.weight, True), _optional(attn.k_proj)
        self.v_weight, self.v_bias = _frozen(attn.v_proj.weight, True), _optional(attn.v_proj)
        self.o_weight, self.o_bias = _frozen(attn.o_proj.weight, True), _optional(attn.o_proj)
        self.q_norm = RMSNorm(attn.q_norm)
        self.k_norm = RMSNorm(attn.k_norm)
        self.scaling = float(attn.scaling)

    @staticmethod
    def _project(x, weight, bias):
        y = x @ weight
        return y + bias if bias is not None else y

    def forward(self, x, cos, sin, mask, past_key, past_value):
        batch, seq = x.shape[0], x.shape[1]
        q = self._project(x, self.q_weight, self.q_bias).reshape(batch, seq, self.n_heads, self.head_dim)
        k = self._project(x, self.k_weight, self.k_bias).reshape(batch, seq, self.n_kv_heads, self.head_dim)
        v = self._project(x, self.v_weight, self.v_bias).reshape(batch, seq, self.n_kv_heads, self.head_dim)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k).transpose(1, 2)
        v = v.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        repeat = self.n_heads // self.n_kv_heads
        total = key.shape[2]
        key_all = key[:, :, None].expand(batch, self.n_kv_heads, repeat, total, self.head_dim).reshape(
            batch, self.n_heads, total, self.head_dim)
        value_all = value[:, :, None].expand(batch, self.n_kv_heads, repeat, total, self.head_dim).reshape(
            batch, self.n_heads, total, self.head_dim)
        scores = (q @ key_all.transpose(2, 3)) * self.scaling + mask
        probs = torch.softmax(scores, dim=-1)
        out = (probs @ value_all).transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self._project(out, self.o_weight, self.o_bias), key, value


class DenseMLP(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate = _frozen(mlp.gate_proj.weight, True)
        self.up = _frozen(mlp.up_proj.weight, True)
        self.down = _frozen(mlp.down_proj.weight, True)

    def forward(self, x):
        return (nn.functional.silu(x @ self.gate) * (x @ self.up)) @ self.down


class DecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, attention: Attention, mlp: nn.Module, is_moe: bool):
        super().__init__()
        self.input_norm = RMSNorm(layer.input_layernorm)
        self.attention = attention
        self.post_norm = RMSNorm(layer.post_attention_layernorm)
        self.mlp = mlp
        self.is_moe = is_moe

    def forward(self, x, cos, sin, mask, past_key, past_value):
        attn, key, value = self.attention(self.input_norm(x), cos, sin, mask, past_key, past_value)
        x = x + attn
        h = self.post_norm(x)
        if self.is_moe:
            h = self.mlp(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        else:
            h = self.mlp(h)
        return x + h, key, value


class DecoderGraph(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: nn.Module, arch, formulation: str = "contrib", share_embedding: bool = True):
        super().__init__()
        config = model.config
        family = arch.family
        if family not in SUPPORTED_FAMILIES:
            raise OnnxExportError(
                f"the ONNX exporter builds {', '.join(SUPPORTED_FAMILIES)} graphs, not {family}; "
                f"export this model to GGUF (`packager export gguf`) instead"
            )
        if getattr(config, "sliding_window", None) is not None:
            raise OnnxExportError("sliding-window attention is not supported by the ONNX exporter; "
                                  "set use_sliding_window=false in config.json if the model was trained without it")
        if getattr(config, "hidden_act", "silu") not in ACTIVATIONS:
            raise OnnxExportError(f"activation {config.hidden_act!r} is not supported (only {ACTIVATIONS})")
        n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        top_k = arch.top_k(config)
        normalize = bool(arch.routing_param(config, "renorm"))
        moe_layers = set(arch.moe_layers(config))
        decoder = model.get_decoder()
        rotary = decoder.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(rotary.attention_scaling)
        embed = decoder.embed_tokens.weight
        head = model.get_output_embeddings().weight
        # A tied head shares one [H, V] initializer with the embedding lookup (a Gather along
        # axis 1), so the file holds the table once and the head reads it without a Transpose.
        # Quantized exports keep two tables: the quantizers handle a Gather on axis 0 and a
        # MatMul, not one initializer read both ways, and two 4/8-bit tables beat one fp32.
        self.tied = share_embedding and head.data_ptr() == embed.data_ptr()
        self.embed = _frozen(embed, transpose=self.tied)
        self.lm_head = None if self.tied else _frozen(head, transpose=True)
        vocab_size = embed.shape[0]
        layers, n_experts = [], {}
        for layer_idx, layer in enumerate(decoder.layers):
            attention = Attention(layer.self_attn, n_heads, n_kv_heads, head_dim)
            if layer_idx in moe_layers:
                router = model.get_parameter(arch.router_weight_name(layer_idx))
                fused = arch.fused_expert_names(layer_idx)
                gate_up, down = model.get_parameter(fused["gate_up"]), model.get_parameter(fused["down"])
                expected = arch.n_experts(config, layer_idx)
                if router.shape[0] != expected or gate_up.shape[0] != expected or down.shape[0] != expected:
                    raise OnnxExportError(
                        f"layer {layer_idx}: config says {expected} experts but the weights hold router {router.shape[0]}, "
                        f"experts {gate_up.shape[0]}; load pruned checkpoints with packager.load_pruned"
                    )
                if expected < top_k:
                    raise OnnxExportError(f"layer {layer_idx} keeps {expected} experts, fewer than top-k {top_k}")
                mlp = RoutedExperts(router, gate_up, down, top_k, normalize, formulation)
                n_experts[layer_idx] = expected
            else:
                mlp = DenseMLP(layer.mlp)
            layers.append(DecoderLayer(layer, attention, mlp, layer_idx in moe_layers))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(decoder.norm)
        self.shape = GraphShape(
            n_layers=len(layers), n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
            hidden_size=config.hidden_size, vocab_size=vocab_size, n_experts=n_experts, top_k=top_k,
        )
        self.formulation = formulation

    def forward(self, input_ids, attention_mask, position_ids, *past):
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        if self.tied:
            x = self.embed.index_select(1, input_ids.reshape(-1)).T.reshape(batch, seq, -1)
        else:
            x = self.embed[input_ids]
        past_len = past[0].shape[2]
        total = past_len + seq
        # causal over cache positions, plus the caller's padding mask
        key_pos = torch.arange(total, device=input_ids.device)
        query_pos = torch.arange(seq, device=input_ids.device) + past_len
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling)[:, None]
        sin = (emb.sin() * self.attention_scaling)[:, None]
        present = []
        for layer_idx, layer in enumerate(self.layers):
            x, key, value = layer(x, cos, sin, mask, past[2 * layer_idx], past[2 * layer_idx + 1])
            present += [key, value]
        x = self.norm(x)
        logits = x @ (self.embed if self.tied else self.lm_head)
        return (logits, *present)
