"""What the ONNX decoder needs to know about each family beyond packager/arch: which named
graph pieces it is made of. Tensor locations, expert counts, dense layers and routing
parameters come from packager.arch; module names are those of the transformers model
(converters.onnx.weights reads them from a meta-device skeleton).

Pieces (converters/onnx/decoder.py):
  attention   "gqa"           grouped-query attention (any KV-head count), rotate-half RoPE
  qk_norm     "per_head"      RMSNorm over each head's dims after the projection (Qwen3-MoE)
              "full"          RMSNorm over the whole q / k projection (OLMoE)
  sinks       per-head attention-sink logits in the softmax (GPT-OSS)
  experts     "gate_up_rows"  [E, 2I, H]: the gate rows, then the up rows (transformers 5 layout)
              "interleaved_cols" [E, H, 2I] with gate/up columns interleaved, down [E, I, H],
                              plus biases (GPT-OSS)
  activation  "swiglu"        silu(gate) * up
              "gpt_oss"       clamped gate * sigmoid(alpha * gate) * (clamped up + 1)
  shared      "sigmoid_gated" one shared expert scaled by sigmoid(x . w) (Qwen2-MoE)
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
}

# how each family's routing reaches ONNX Runtime's MoE operator (written into the export config)
CONTRIB_ROUTING_NOTE = {
    "softmax_topk": "MoE op: softmax over the router logits, top-k, renormalised when the family does",
    "topk_softmax": "MoE op: router logits plus bias; softmax then top-k then renormalisation equals "
                    "top-k of the logits then softmax over the k",
}


def supported_families() -> tuple[str, ...]:
    return tuple(PIECES)
