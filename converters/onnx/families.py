"""What the ONNX decoder needs to know about each family beyond packager/core/arch: which named
graph pieces it is made of. Tensor locations, expert counts, dense layers and routing
parameters come from packager.core.arch; module names are those of the transformers model
(converters.onnx.weights reads them from a meta-device skeleton).

Pieces (converters/onnx/decoder.py):
  attention   "gqa"           grouped-query attention (any KV-head count), rotate-half RoPE
              "mla"           multi-head latent attention (DeepSeek-V3): q through q_a / q_a_layernorm /
                              q_b (or q_proj), kv_a_proj_with_mqa split into the compressed kv (normed,
                              expanded by kv_b_proj into nope keys and values) and one shared rope key;
                              RoPE on the rope dims only, interleaved pairs when config.rope_interleave.
                              The cache holds the expanded keys / values of every head, the values
                              zero-padded to the key width (one head_dim for both)
  qk_norm     "per_head"      RMSNorm over each head's dims after the projection (Qwen3-MoE)
              "full"          RMSNorm over the whole q / k projection (OLMoE)
  sinks       per-head attention-sink logits in the softmax (GPT-OSS)
  experts     "gate_up_rows"  [E, 2I, H]: the gate rows, then the up rows (transformers 5 layout)
              "interleaved_cols" [E, H, 2I] with gate/up columns interleaved, down [E, I, H],
                              plus biases (GPT-OSS)
  activation  "swiglu"        silu(gate) * up
              "gpt_oss"       clamped gate * sigmoid(alpha * gate) * (clamped up + 1)
  shared      "sigmoid_gated" one shared expert scaled by sigmoid(x . w) (Qwen2-MoE)
              "plain"         shared experts (one MLP) added ungated (DeepSeek-V3)
  routing     from packager.core.arch: softmax_topk / topk_softmax go to the MoE op as router logits;
              sigmoid_group (DeepSeek-V3: biased selection, group-limited top-k, unbiased renormalised
              and scaled weights) is computed with standard ops (`DecoderBuilder.sigmoid_group_weights`)
              and reaches the MoE op as log-weights, see PRECOMPUTED_ROUTING_NOTE
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyPieces:
    attention: str = "gqa"
    qk_norm: str | None = None
    sinks: bool = False
    experts: str = "gate_up_rows"
    activation: str = "swiglu"
    shared: str | None = None
    shared_module: str = ""          # relative to the MoE block module
    shared_gate_module: str = ""


PIECES: dict[str, FamilyPieces] = {
    "qwen3_moe": FamilyPieces(qk_norm="per_head"),
    "mixtral": FamilyPieces(),
    "olmoe": FamilyPieces(qk_norm="full"),
    "qwen2_moe": FamilyPieces(shared="sigmoid_gated", shared_module="shared_expert", shared_gate_module="shared_expert_gate"),
    "gpt_oss": FamilyPieces(sinks=True, experts="interleaved_cols", activation="gpt_oss"),
    "deepseek_v3": FamilyPieces(attention="mla", shared="plain", shared_module="shared_experts"),
}

# how each family's routing reaches ONNX Runtime's MoE operator (written into the export config)
CONTRIB_ROUTING_NOTE = {
    "softmax_topk": "MoE op: softmax over the router logits, top-k, renormalised when the family does",
    "topk_softmax": "MoE op: router logits plus bias; softmax then top-k then renormalisation equals "
                    "top-k of the logits then softmax over the k",
    "sigmoid_group": "routing in standard ops (sigmoid, score-correction bias for selection, group-limited "
                     "TopK, unbiased weights renormalised and scaled); the MoE op gets log(weight) of the k "
                     "chosen experts (a large negative number elsewhere), so its softmax and top-k pick "
                     "exactly those with weight/sum; the op's output is multiplied back by the sum",
}


def supported_families() -> tuple[str, ...]:
    return tuple(PIECES)
