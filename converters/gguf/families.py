"""The GGUF side of the architecture facts: for each MoE family that stock llama.cpp runs,
its llama.cpp architecture name, where every Hugging Face tensor goes, which hyperparameters
it reads, and what its compute graph hard-codes (so a checkpoint that differs is refused
instead of silently computing something else).

Checked against llama.cpp 0c1e57098 (the one llama-cpp-python 0.3.36 bundles) by loading
and running tiny models of each family (tests/test_gguf*.py). The routed experts and routers
come from packager.core.arch (roles); this file names their GGUF tensors. Shared-expert and
attention tensors are listed here as Hugging Face -> GGUF pairs.

Templates use `${layer_idx}`; `tensor_name` is the only expansion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from string import Template
from typing import Any, Mapping

from packager.core.errors import UnsupportedArchitecture

# our own metadata keys (llama.cpp ignores unknown keys)
KEY_VERSION = "packager.version"
KEY_FAMILY = "packager.family"
KEY_FINGERPRINT = "packager.model_fingerprint"
KEY_PARENT_FINGERPRINT = "packager.parent_fingerprint"
KEY_PLAN = "packager.plan"
KEY_MOE_LAYERS = "packager.moe_layers"
KEY_SOURCE = "packager.source"
KEY_QUANT = "packager.quantization"

# hparam value sources that are not a plain config key
HEAD_DIM = "$head_dim"
ROPE_THETA = "$rope_theta"
ROPE_TYPE = "$rope_type"
ROPE_FACTOR = "$rope_factor"
ROPE_ORIGINAL_CONTEXT = "$rope_original_context"
N_EXPERTS = "$n_experts"
TOP_K = "$top_k"

_COMMON_HPARAMS = (
    ("context_length", "u32", "max_position_embeddings"),
    ("embedding_length", "u32", "hidden_size"),
    ("block_count", "u32", "num_hidden_layers"),
    ("attention.head_count", "u32", "num_attention_heads"),
    ("attention.head_count_kv", "u32", "num_key_value_heads"),
    ("attention.key_length", "u32", HEAD_DIM),
    ("attention.value_length", "u32", HEAD_DIM),
    ("rope.freq_base", "f32", ROPE_THETA),
    ("attention.layer_norm_rms_epsilon", "f32", "rms_norm_eps"),
    ("expert_count", "u32", N_EXPERTS),
    ("expert_used_count", "u32", TOP_K),
)

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

_ATTENTION = {
    "model.layers.${layer_idx}.input_layernorm.weight": "blk.${layer_idx}.attn_norm.weight",
    "model.layers.${layer_idx}.self_attn.q_proj.weight": "blk.${layer_idx}.attn_q.weight",
    "model.layers.${layer_idx}.self_attn.k_proj.weight": "blk.${layer_idx}.attn_k.weight",
    "model.layers.${layer_idx}.self_attn.v_proj.weight": "blk.${layer_idx}.attn_v.weight",
    "model.layers.${layer_idx}.self_attn.o_proj.weight": "blk.${layer_idx}.attn_output.weight",
    "model.layers.${layer_idx}.post_attention_layernorm.weight": "blk.${layer_idx}.ffn_norm.weight",
}
_QKV_BIAS = {
    "model.layers.${layer_idx}.self_attn.q_proj.bias": "blk.${layer_idx}.attn_q.bias",
    "model.layers.${layer_idx}.self_attn.k_proj.bias": "blk.${layer_idx}.attn_k.bias",
    "model.layers.${layer_idx}.self_attn.v_proj.bias": "blk.${layer_idx}.attn_v.bias",
}
_QK_NORM = {
    "model.layers.${layer_idx}.self_attn.q_norm.weight": "blk.${layer_idx}.attn_q_norm.weight",
    "model.layers.${layer_idx}.self_attn.k_norm.weight": "blk.${layer_idx}.attn_k_norm.weight",
}
_EXPERTS = {
    "gate": "blk.${layer_idx}.ffn_gate_exps.weight",
    "up": "blk.${layer_idx}.ffn_up_exps.weight",
    "down": "blk.${layer_idx}.ffn_down_exps.weight",
}
_ROUTER = "blk.${layer_idx}.ffn_gate_inp.weight"


@dataclass(frozen=True)
class FusedPart:
    """How one GGUF expert tensor comes out of a fused on-disk tensor, per expert: take the
    `source` role (packager.core.arch fused role), split it along `axis` ("first_half",
    "second_half", "even", "odd" or None), then transpose when stored [in, out]."""

    source: str
    split: str | None = None
    axis: int = 0
    transpose: bool = False


# Qwen / OLMoE / Mixtral fused layout (transformers 5 in memory): gate_up [E, 2I, H] = gate
# rows then up rows, down [E, H, I]: already [out, in].
_FUSED_HALVES = {
    "gate": FusedPart("gate_up", "first_half", axis=0),
    "up": FusedPart("gate_up", "second_half", axis=0),
    "down": FusedPart("down"),
}


@dataclass(frozen=True)
class GGUFFamily:
    """How one packager family is written for llama.cpp."""

    family: str
    gguf_arch: str
    tensors: Mapping[str, str]                 # HF template -> GGUF template (non-routed tensors)
    optional: frozenset[str]                   # HF templates that may be absent (tied head, biases)
    experts: Mapping[str, str]                 # expert role -> stacked GGUF template
    router: str
    fused: Mapping[str, FusedPart] = field(default_factory=lambda: dict(_FUSED_HALVES))  # role -> part of a fused tensor
    mxfp4: Mapping[str, FusedPart] = field(default_factory=dict)  # role -> part of MXFP4 blocks (dequantised)
    router_bias: str | None = None
    score_bias: str | None = None
    hparams: tuple[tuple[str, str, str], ...] = _COMMON_HPARAMS  # (key under "{arch}.", type, source)
    requires: Mapping[str, Any] = field(default_factory=dict)    # config key -> value llama.cpp assumes
    requires_absent: tuple[str, ...] = ()      # config keys that must be null/absent
    requires_equal: tuple[tuple[str, str], ...] = ()  # config keys whose values must agree
    permute_qk: bool = False                   # llama.cpp's "llama" arch wants q/k rows in rope-interleaved order
    rope_types: tuple[str, ...] = ("default",)  # rope_parameters.rope_type values the GGUF hparams can express
    all_layers_moe: bool = True                # the graph has no dense-MLP layers

    def tensor_name(self, template: str, layer_idx: int | None = None) -> str:
        return Template(template).substitute(layer_idx=layer_idx) if layer_idx is not None else template

    def global_tensors(self) -> dict[str, str]:
        return {hf: gguf for hf, gguf in self.tensors.items() if "${layer_idx}" not in hf}

    def layer_tensors(self, layer_idx: int) -> dict[str, str]:
        return {
            self.tensor_name(hf, layer_idx): self.tensor_name(gguf, layer_idx)
            for hf, gguf in self.tensors.items()
            if "${layer_idx}" in hf
        }

    def is_optional(self, hf_name: str, layer_idx: int | None) -> bool:
        return any(self.tensor_name(t, layer_idx if "${layer_idx}" in t else None) == hf_name for t in self.optional)

    def expert_names(self, layer_idx: int) -> dict[str, str]:
        return {role: self.tensor_name(t, layer_idx) for role, t in self.experts.items()}

    def router_name(self, layer_idx: int) -> str:
        return self.tensor_name(self.router, layer_idx)

    def router_bias_name(self, layer_idx: int) -> str | None:
        return self.tensor_name(self.router_bias, layer_idx) if self.router_bias else None

    def score_bias_name(self, layer_idx: int) -> str | None:
        return self.tensor_name(self.score_bias, layer_idx) if self.score_bias else None

    def key(self, suffix: str) -> str:
        """A metadata key of this architecture, e.g. 'qwen3moe.expert_count'."""
        return f"{self.gguf_arch}.{suffix}"


FAMILIES: dict[str, GGUFFamily] = {
    "qwen3_moe": GGUFFamily(
        family="qwen3_moe",
        gguf_arch="qwen3moe",
        tensors={**_GLOBAL, **_ATTENTION, **_QK_NORM},
        optional=frozenset({"lm_head.weight"}),
        experts=_EXPERTS,
        router=_ROUTER,
        hparams=_COMMON_HPARAMS + (
            ("feed_forward_length", "u32", "intermediate_size"),
            ("expert_feed_forward_length", "u32", "moe_intermediate_size"),
        ),
        # llama.cpp's qwen3moe graph always renormalises the top-k weights
        requires={"norm_topk_prob": True, "attention_bias": False},
    ),
    "qwen2_moe": GGUFFamily(
        family="qwen2_moe",
        gguf_arch="qwen2moe",
        tensors={
            **_GLOBAL, **_ATTENTION, **_QKV_BIAS,
            "model.layers.${layer_idx}.mlp.shared_expert.gate_proj.weight": "blk.${layer_idx}.ffn_gate_shexp.weight",
            "model.layers.${layer_idx}.mlp.shared_expert.up_proj.weight": "blk.${layer_idx}.ffn_up_shexp.weight",
            "model.layers.${layer_idx}.mlp.shared_expert.down_proj.weight": "blk.${layer_idx}.ffn_down_shexp.weight",
            "model.layers.${layer_idx}.mlp.shared_expert_gate.weight": "blk.${layer_idx}.ffn_gate_inp_shexp.weight",
        },
        optional=frozenset({"lm_head.weight"}),
        experts=_EXPERTS,
        router=_ROUTER,
        hparams=_COMMON_HPARAMS + (
            ("feed_forward_length", "u32", "intermediate_size"),
            ("expert_feed_forward_length", "u32", "moe_intermediate_size"),
            ("expert_shared_feed_forward_length", "u32", "shared_expert_intermediate_size"),
        ),
        # llama.cpp's qwen2moe graph does not renormalise the top-k weights
        requires={"norm_topk_prob": False, "qkv_bias": True},
    ),
    "olmoe": GGUFFamily(
        family="olmoe",
        gguf_arch="olmoe",
        tensors={**_GLOBAL, **_ATTENTION, **_QK_NORM},
        optional=frozenset({"lm_head.weight"}),
        experts=_EXPERTS,
        router=_ROUTER,
        # llama.cpp sizes OLMoE experts with feed_forward_length (the HF intermediate_size)
        hparams=_COMMON_HPARAMS + (("feed_forward_length", "u32", "intermediate_size"),),
        requires={"norm_topk_prob": False, "attention_bias": False},
        requires_absent=("clip_qkv",),
        # llama.cpp sizes OLMoE's k_norm as the full hidden size: no grouped-query attention
        requires_equal=(("num_key_value_heads", "num_attention_heads"),),
    ),
    "mixtral": GGUFFamily(
        family="mixtral",
        gguf_arch="llama",
        tensors={**_GLOBAL, **_ATTENTION},
        optional=frozenset({"lm_head.weight"}),
        experts=_EXPERTS,
        router=_ROUTER,
        hparams=_COMMON_HPARAMS + (
            ("feed_forward_length", "u32", "intermediate_size"),
            ("rope.dimension_count", "u32", HEAD_DIM),
        ),
        requires_absent=("sliding_window",),
        permute_qk=True,
    ),
    "gpt_oss": GGUFFamily(
        family="gpt_oss",
        gguf_arch="gpt-oss",
        tensors={
            **_GLOBAL, **_QKV_BIAS,
            "model.layers.${layer_idx}.input_layernorm.weight": "blk.${layer_idx}.attn_norm.weight",
            "model.layers.${layer_idx}.self_attn.q_proj.weight": "blk.${layer_idx}.attn_q.weight",
            "model.layers.${layer_idx}.self_attn.k_proj.weight": "blk.${layer_idx}.attn_k.weight",
            "model.layers.${layer_idx}.self_attn.v_proj.weight": "blk.${layer_idx}.attn_v.weight",
            "model.layers.${layer_idx}.self_attn.o_proj.weight": "blk.${layer_idx}.attn_output.weight",
            "model.layers.${layer_idx}.self_attn.o_proj.bias": "blk.${layer_idx}.attn_output.bias",
            "model.layers.${layer_idx}.self_attn.sinks": "blk.${layer_idx}.attn_sinks.weight",
            "model.layers.${layer_idx}.post_attention_layernorm.weight": "blk.${layer_idx}.post_attention_norm.weight",
        },
        optional=frozenset({"lm_head.weight"}),
        experts={
            **_EXPERTS,
            "gate_bias": "blk.${layer_idx}.ffn_gate_exps.bias",
            "up_bias": "blk.${layer_idx}.ffn_up_exps.bias",
            "down_bias": "blk.${layer_idx}.ffn_down_exps.bias",
        },
        # transformers stores GPT-OSS experts [E, in, out] with gate and up columns interleaved
        fused={
            "gate": FusedPart("gate_up", "even", axis=1, transpose=True),
            "up": FusedPart("gate_up", "odd", axis=1, transpose=True),
            "down": FusedPart("down", transpose=True),
            "gate_bias": FusedPart("gate_up_bias", "even", axis=0),
            "up_bias": FusedPart("gate_up_bias", "odd", axis=0),
            "down_bias": FusedPart("down_bias"),
        },
        # MXFP4 checkpoints store the weights [E, out, in] (blocks along in), gate/up rows interleaved
        mxfp4={
            "gate": FusedPart("gate_up_blocks", "even", axis=0),
            "up": FusedPart("gate_up_blocks", "odd", axis=0),
            "down": FusedPart("down_blocks"),
            "gate_bias": FusedPart("gate_up_bias", "even", axis=0),
            "up_bias": FusedPart("gate_up_bias", "odd", axis=0),
            "down_bias": FusedPart("down_bias"),
        },
        router=_ROUTER,
        router_bias="blk.${layer_idx}.ffn_gate_inp.bias",
        hparams=_COMMON_HPARAMS + (
            ("expert_feed_forward_length", "u32", "intermediate_size"),
            ("attention.sliding_window", "u32", "sliding_window"),
            ("rope.scaling.type", "str", ROPE_TYPE),
            ("rope.scaling.factor", "f32", ROPE_FACTOR),
            ("rope.scaling.original_context_length", "u32", ROPE_ORIGINAL_CONTEXT),
        ),
        # llama.cpp's gpt-oss graph hard-codes the clamped SwiGLU of the released models
        requires={"swiglu_limit": 7.0, "swiglu_alpha": 1.702},
        rope_types=("yarn",),
    ),
}


def supported_gguf_families() -> list[str]:
    return sorted(FAMILIES)


def gguf_family(family: str) -> GGUFFamily:
    try:
        return FAMILIES[family]
    except KeyError:
        from converters.onnx.options import SUPPORTED_FAMILIES as ONNX_FAMILIES

        raise UnsupportedArchitecture(
            f"family {family!r} has no GGUF export (stock llama.cpp); GGUF supports: "
            f"{', '.join(supported_gguf_families())}"
            + (" (use `packager export onnx` for this one)" if family in ONNX_FAMILIES else "; nor does ONNX yet")
        ) from None


def family_of_gguf_arch(gguf_arch: str) -> GGUFFamily:
    for fam in FAMILIES.values():
        if fam.gguf_arch == gguf_arch:
            return fam
    raise UnsupportedArchitecture(
        f"GGUF architecture {gguf_arch!r} is not one this packager can prune; supported: "
        f"{', '.join(sorted(f.gguf_arch for f in FAMILIES.values()))}"
    )
