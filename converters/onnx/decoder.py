"""The decoder graph with a KV cache, built node by node with onnx.helper from the architecture
facts, its weights streamed into the external-data file one tensor (or row chunk, or expert)
at a time. Nothing is traced and the model is never materialised: peak memory is one tensor
chunk (one int8-quantized matrix at most), whatever the model's size.

Signature (names from runtime.backends.onnx_backend, the one place for them):
  input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
  past_key_values.{i}.key / .value [B, n_kv_heads, P, head_dim] float32
  -> logits [B, S, V] float32, present.{i}.key / .value [B, n_kv_heads, P+S, head_dim].

Hidden states flow as [tokens, hidden] (tokens = B*S); only attention is 4/5-D. Linear
weights stay in the checkpoint's [out, in] layout (Gemm transB=1, MatMulNBits and QMoE read it
as is), so no matrix is ever transposed in memory except int8 ones (MatMulInteger reads
[in, out]), which are held at one byte per value.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from converters.onnx.errors import OnnxExportError
from converters.onnx.families import PIECES, FamilyPieces
from converters.onnx.graph_writer import CONTRIB_DOMAIN, GraphBuilder
from converters.onnx.quantize import quantize_rows
from runtime.backends.onnx_backend import (
    ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_names, present_names,
)

logger = logging.getLogger(__name__)

INT4_BLOCK_SIZES = (32, 16)  # preferred first; MatMulNBits / QMoE take powers of two >= 16
FLOAT_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class GraphShape:
    """What the runtime needs to know to feed the graph."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    n_experts: dict[int, int]
    top_k: int                                  # the largest k (every layer's when uniform)
    top_k_per_layer: dict[int, int] = field(default_factory=dict)  # MoE layer -> its k


@dataclass
class Record:
    """Which tensor went through which op (the export config's quantization record)."""

    tensors: dict[str, dict] = field(default_factory=dict)
    kept_fp32: list[str] = field(default_factory=list)


def _block_size(cols: int) -> int | None:
    return next((size for size in INT4_BLOCK_SIZES if cols % size == 0), None)


class Linears:
    """Emits y = x @ W.T (+ b) for a weight given as [out, in] row chunks, at the export's
    precision: fp32 / fp16 storage (Gemm), int8 (MatMulInteger, per-output-channel scales,
    dynamic activation quantization) or int4 (MatMulNBits, symmetric blocks along `in`)."""

    def __init__(self, g: GraphBuilder, quant: str, dtype: str, record: Record):
        self.g, self.quant, self.record = g, quant, record
        self.float_dtype = FLOAT_DTYPES[dtype]

    def float_weight(self, name: str, shape, chunks, keep_fp32: bool = False) -> str:
        """An initializer at the storage dtype, read as float32 by the graph."""
        dtype = np.float32 if keep_fp32 else self.float_dtype
        stored = self.g.weight(name, dtype, shape, (c.astype(dtype, copy=False) for c in chunks))
        if dtype == np.float32:
            return stored
        return self.g.op("Cast", [stored], name=f"{name}/cast", to=TensorProto.FLOAT)

    def __call__(self, x: str, name: str, shape, chunks, bias: np.ndarray | None = None, keep_fp32: bool = False) -> str:
        rows, cols = shape
        g = self.g
        if keep_fp32 or self.quant == "fp32" or (self.quant == "int4" and _block_size(cols) is None):
            w = self.float_weight(name, shape, chunks, keep_fp32)
            inputs = [x, w] + ([g.small_weight(f"{name}.bias", bias.astype(np.float32))] if bias is not None else [])
            return g.op("Gemm", inputs, name=name, transB=1)
        if self.quant == "int8":
            codes = np.empty((cols, rows), dtype=np.int8)  # MatMulInteger reads [in, out]
            scales = np.empty(rows, dtype=np.float32)
            row = 0
            for chunk in chunks:
                packed, scale = quantize_rows(chunk[None], 8, None)
                codes[:, row:row + chunk.shape[0]] = (packed[0].astype(np.int16) - 128).astype(np.int8).T
                scales[row:row + chunk.shape[0]] = scale[0]
                row += chunk.shape[0]
            w = g.weight(f"{name}.q8", np.int8, codes.shape, [codes])
            del codes
            xq, xs, xz = g.op("DynamicQuantizeLinear", [x], 3, name=f"{name}/quantize_input")
            product = g.op("MatMulInteger", [xq, w, xz], name=f"{name}/matmul")
            scale = g.op("Mul", [xs, g.small_weight(f"{name}.scales", scales)], name=f"{name}/scale")
            y = g.op("Mul", [g.op("Cast", [product], name=f"{name}/cast", to=TensorProto.FLOAT), scale], name=name)
            self.record.tensors[name] = {"op": "MatMulInteger+Mul", "bits": 8, "block_size": "per-row"}
        else:
            block = _block_size(cols)
            n_blocks = cols // block
            scales = []

            def packed():
                for chunk in chunks:
                    codes, scale = quantize_rows(chunk[None], 4, block)
                    scales.append(scale[0])
                    yield codes[0].reshape(chunk.shape[0], n_blocks, block // 2)

            w = g.weight(f"{name}.q4", np.uint8, (rows, n_blocks, block // 2), packed())
            s = g.small_weight(f"{name}.scales", np.concatenate(scales).reshape(-1))
            y = g.op("MatMulNBits", [x, w, s], name=name, domain=CONTRIB_DOMAIN, K=cols, N=rows, bits=4, block_size=block)
            self.record.tensors[name] = {"op": "MatMulNBits", "bits": 4, "block_size": block}
        if bias is not None:
            y = g.op("Add", [y, g.small_weight(f"{name}.bias", bias.astype(np.float32))], name=f"{name}/bias")
        return y


class DecoderBuilder:
    """Builds the graph of one checkpoint (converters.onnx.weights.CheckpointWeights)."""

    def __init__(self, g: GraphBuilder, weights, quant: str, dtype: str, formulation: str):
        self.g, self.w = g, weights
        self.quant, self.dtype, self.formulation = quant, dtype, formulation
        self.record = Record()
        self.linear = Linears(g, quant, dtype, record=self.record)
        self.arch, self.config = weights.arch, weights.config
        family = self.arch.family
        if family not in PIECES:
            raise OnnxExportError(f"the ONNX exporter has no graph pieces for {family}")
        self.pieces: FamilyPieces = PIECES[family]
        skeleton = weights.skeleton
        text = skeleton.config.get_text_config() if hasattr(skeleton.config, "get_text_config") else skeleton.config
        self.text_config = text
        act = getattr(text, "hidden_act", "silu")
        if act != "silu":
            raise OnnxExportError(f"activation {act!r} is not supported by the ONNX exporter (only silu)")
        self.n_heads, self.n_kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.n_heads
        if self.pieces.attention == "mla":  # every head keeps its expanded key / value (see families.py)
            self.qk_head_dim = text.qk_nope_head_dim + text.qk_rope_head_dim
            self.n_kv_heads, self.head_dim = self.n_heads, max(self.qk_head_dim, text.v_head_dim)
        self.hidden = text.hidden_size
        self.top_k = self.arch.top_k(self.config)  # the largest; each MoE layer's own k is in layer_k
        self.layer_k = dict(zip(self.arch.moe_layers(self.config), self.arch.layer_top_ks(self.config)))
        self.moe_layers = set(self.layer_k)
        self.routing = self.arch.routing_settings(self.config)  # renorm, scaling, groups (each layer's k is layer_k)
        self.layer_types = list(getattr(text, "layer_types", None) or [])
        self.n_experts: dict[int, int] = {}
        self.routing_notes: dict[str, str] = {}

    # ------------------------------------------------------------------ small pieces
    def rms_norm(self, x: str, weight_name: str, eps: float, onnx_name: str) -> str:
        g = self.g
        weight = g.small_weight(onnx_name, self.w.array(weight_name).astype(np.float32))
        mean = g.op("ReduceMean", [g.op("Mul", [x, x])], name=f"{onnx_name}/mean_square", axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(eps)])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), weight], name=onnx_name)

    def projection(self, x: str, module: str, onnx_name: str, keep_fp32: bool = False) -> str:
        weight = f"{module}.weight"
        bias = f"{module}.bias"
        return self.linear(x, onnx_name, self.w.shape(weight), self.w.row_chunks(weight),
                           self.w.array(bias) if self.w.has(bias) else None, keep_fp32)

    def silu(self, x: str) -> str:
        return self.g.op("Mul", [x, self.g.op("Sigmoid", [x])])

    def gated(self, gate: str, up: str) -> str:
        """The expert activation of the family on separate gate / up projections."""
        g = self.g
        if self.pieces.activation == "swiglu":
            return g.op("Mul", [self.silu(gate), up])
        alpha = float(getattr(self.text_config, "swiglu_alpha", 1.702))
        limit = float(getattr(self.text_config, "swiglu_limit", 7.0))
        gate = g.op("Min", [gate, g.const(limit)])
        up = g.op("Clip", [up, g.const(-limit), g.const(limit)])
        glu = g.op("Mul", [gate, g.op("Sigmoid", [g.op("Mul", [gate, g.const(alpha)])])])
        return g.op("Mul", [g.op("Add", [up, g.const(1.0)]), glu])

    def dense_mlp(self, x: str, module: str, prefix: str) -> str:
        gate = self.projection(x, f"{module}.gate_proj", f"{prefix}.gate")
        up = self.projection(x, f"{module}.up_proj", f"{prefix}.up")
        return self.projection(self.gated(gate, up), f"{module}.down_proj", f"{prefix}.down")

    # ------------------------------------------------------------------ positions and masks
    def rotary_tables(self, position_ids: str) -> tuple[str, str]:
        g = self.g
        rotary = self.w.rotary()
        inv_freq = rotary.inv_freq.detach().float().numpy()
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        positions = g.op("Unsqueeze", [g.op("Cast", [position_ids], to=TensorProto.FLOAT), g.const([-1], np.int64)])
        freqs = g.op("Mul", [positions, g.const(inv_freq)])
        emb = g.op("Concat", [freqs, freqs], axis=-1)
        cos = g.op("Mul", [g.op("Cos", [emb]), g.const(scaling)])
        sin = g.op("Mul", [g.op("Sin", [emb]), g.const(scaling)])
        axis = g.const([1], np.int64)
        return g.op("Unsqueeze", [cos, axis], name="rope_cos"), g.op("Unsqueeze", [sin, axis], name="rope_sin")

    def masks(self, attention_mask: str, seq: str, past_len: str) -> dict[int | None, str]:
        """Additive masks [B, 1, 1, S, P+S] (0 or float32 min): causal + padding, and per
        sliding window size."""
        g = self.g
        total = g.op("Shape", [attention_mask], start=1, end=2)
        key_pos = g.op("Range", [g.const(0, np.int64), g.op("Squeeze", [total]), g.const(1, np.int64)])
        query_pos = g.op("Add", [g.op("Range", [g.const(0, np.int64), g.op("Squeeze", [seq]), g.const(1, np.int64)]),
                                 g.op("Squeeze", [past_len])])
        query_col = g.op("Unsqueeze", [query_pos, g.const([1], np.int64)])          # [S, 1]
        causal = g.op("LessOrEqual", [key_pos, query_col])                          # [S, T]
        padding = g.op("Unsqueeze", [g.op("Greater", [attention_mask, g.const(0, np.int64)]), g.const([1, 2, 3], np.int64)])
        windows = {None}
        sliding = getattr(self.text_config, "sliding_window", None)
        if sliding and "sliding_attention" in self.layer_types:
            windows.add(int(sliding))
        elif sliding and not self.layer_types and getattr(self.text_config, "use_sliding_window", True):
            raise OnnxExportError("sliding-window attention on every layer is not supported by the ONNX exporter; "
                                  "set use_sliding_window=false in config.json if the model was trained without it")
        out = {}
        for window in windows:
            allowed = causal
            if window is not None:  # key within the last `window` positions: q - k < window
                inside = g.op("Greater", [key_pos, g.op("Sub", [query_col, g.const(window, np.int64)])])
                allowed = g.op("And", [allowed, inside])
            allowed = g.op("And", [g.op("Unsqueeze", [allowed, g.const([0, 1, 2], np.int64)]), padding])  # [B,1,1,S,T]
            minimum = float(np.finfo(np.float32).min)
            out[window] = g.op("Where", [allowed, g.const(0.0), g.const(minimum)], name=f"mask_{window or 'full'}")
        return out

    def window_of(self, layer_idx: int) -> int | None:
        if self.layer_types and self.layer_types[layer_idx] == "sliding_attention":
            return int(self.text_config.sliding_window)
        return None

    # ------------------------------------------------------------------ attention
    def attention(self, x: str, layer_idx: int, cos: str, sin: str, mask: str, dims: str,
                  past_key: str, past_value: str) -> tuple[str, str, str]:
        if self.pieces.attention == "mla":
            return self.mla_attention(x, layer_idx, cos, sin, mask, dims, past_key, past_value)
        g = self.g
        module = f"model.layers.{layer_idx}.self_attn"
        prefix = f"layers.{layer_idx}.attention"
        attn = self.w.skeleton.get_submodule(module)
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.projection(x, f"{module}.q_proj", f"{prefix}.q_weight")
        k = self.projection(x, f"{module}.k_proj", f"{prefix}.k_weight")
        v = self.projection(x, f"{module}.v_proj", f"{prefix}.v_weight")
        if self.pieces.qk_norm == "full":
            q = self.rms_norm(q, f"{module}.q_norm.weight", attn.q_norm.variance_epsilon, f"{prefix}.q_norm")
            k = self.rms_norm(k, f"{module}.k_norm.weight", attn.k_norm.variance_epsilon, f"{prefix}.k_norm")
        clip = getattr(self.text_config, "clip_qkv", None)
        if clip is not None:
            q, k, v = (g.op("Clip", [t, g.const(-float(clip)), g.const(float(clip))]) for t in (q, k, v))

        def heads_first(t, n):  # [T, n*D] -> [B, n, S, D]
            t = g.op("Reshape", [t, g.op("Concat", [dims, g.const([n, dim], np.int64)], axis=0)])
            return t

        q, k, v = heads_first(q, heads), heads_first(k, kv_heads), heads_first(v, kv_heads)
        if self.pieces.qk_norm == "per_head":
            q = self.rms_norm(q, f"{module}.q_norm.weight", attn.q_norm.variance_epsilon, f"{prefix}.q_norm")
            k = self.rms_norm(k, f"{module}.k_norm.weight", attn.k_norm.variance_epsilon, f"{prefix}.k_norm")
        perm = dict(perm=[0, 2, 1, 3])
        q, k, v = g.op("Transpose", [q], **perm), g.op("Transpose", [k], **perm), g.op("Transpose", [v], **perm)

        def rope(t):
            first, second = g.op("Split", [t, g.const([dim // 2, dim // 2], np.int64)], 2, axis=-1)
            rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
            return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rotated, sin])])

        q, k = rope(q), rope(k)
        key = g.op("Concat", [past_key, k], axis=2, name=f"{prefix}/key")
        value = g.op("Concat", [past_value, v], axis=2, name=f"{prefix}/value")
        # grouped heads without copying the cache: q [B, KV, rep, S, D] against k [B, KV, 1, T, D]
        rep = heads // kv_heads
        q5 = g.op("Reshape", [q, g.const([0, kv_heads, rep, -1, dim], np.int64)])
        k5 = g.op("Unsqueeze", [key, g.const([2], np.int64)])
        v5 = g.op("Unsqueeze", [value, g.const([2], np.int64)])
        scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])
        scores = g.op("Add", [g.op("Mul", [scores, g.const(float(attn.scaling))]), mask])
        if self.pieces.sinks:
            sinks = self.w.array(f"{module}.sinks").astype(np.float32).reshape(1, kv_heads, rep, 1, 1)
            sink = g.small_weight(f"{prefix}.sinks", sinks)
            top = g.op("Max", [g.op("ReduceMax", [scores], axes=[-1], keepdims=1), sink])
            exp = g.op("Exp", [g.op("Sub", [scores, top])])
            denominator = g.op("Add", [g.op("ReduceSum", [exp, g.const([-1], np.int64)], keepdims=1),
                                       g.op("Exp", [g.op("Sub", [sink, top])])])
            probs = g.op("Div", [exp, denominator])
        else:
            probs = g.op("Softmax", [scores], axis=-1)
        out = g.op("MatMul", [probs, v5])                                  # [B, KV, rep, S, D]
        out = g.op("Reshape", [out, g.const([0, heads, -1, dim], np.int64)])
        out = g.op("Transpose", [out], **perm)                              # [B, S, H, D]
        out = g.op("Reshape", [out, g.const([-1, heads * dim], np.int64)])
        return self.projection(out, f"{module}.o_proj", f"{prefix}.o_weight"), key, value

    def mla_rope(self, t: str, cos: str, sin: str) -> str:
        """RoPE on [B, n, S, R] rope dims: rotate-half, or DeepSeek's interleaved pairs
        (x0, x1), (x2, x3), ... each rotated by one frequency, written as the even rotations
        then the odd ones (transformers' layout)."""
        g = self.g
        rope = self.text_config.qk_rope_head_dim
        if not getattr(self.text_config, "rope_interleave", False):
            first, second = g.op("Split", [t, g.const([rope // 2, rope // 2], np.int64)], 2, axis=-1)
            rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
            return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rotated, sin])])
        half = [g.const([0], np.int64), g.const([rope // 2], np.int64), g.const([-1], np.int64)]
        cos_h, sin_h = g.op("Slice", [cos, *half]), g.op("Slice", [sin, *half])
        big = g.const([rope], np.int64)
        axis, step = g.const([-1], np.int64), g.const([2], np.int64)
        even = g.op("Slice", [t, g.const([0], np.int64), big, axis, step])
        odd = g.op("Slice", [t, g.const([1], np.int64), big, axis, step])
        return g.op("Concat", [g.op("Sub", [g.op("Mul", [even, cos_h]), g.op("Mul", [odd, sin_h])]),
                               g.op("Add", [g.op("Mul", [odd, cos_h]), g.op("Mul", [even, sin_h])])], axis=-1)

    def mla_attention(self, x: str, layer_idx: int, cos: str, sin: str, mask: str, dims: str,
                      past_key: str, past_value: str) -> tuple[str, str, str]:
        """Multi-head latent attention (DeepSeek-V3), see families.py."""
        g = self.g
        text = self.text_config
        module = f"model.layers.{layer_idx}.self_attn"
        prefix = f"layers.{layer_idx}.attention"
        attn = self.w.skeleton.get_submodule(module)
        heads, width = self.n_heads, self.head_dim
        nope, rope, v_dim, lora = text.qk_nope_head_dim, text.qk_rope_head_dim, text.v_head_dim, text.kv_lora_rank
        qk = nope + rope
        if getattr(text, "q_lora_rank", None):
            q = self.projection(x, f"{module}.q_a_proj", f"{prefix}.q_a")
            q = self.rms_norm(q, f"{module}.q_a_layernorm.weight", attn.q_a_layernorm.variance_epsilon, f"{prefix}.q_a_norm")
            q = self.projection(q, f"{module}.q_b_proj", f"{prefix}.q_b")
        else:
            q = self.projection(x, f"{module}.q_proj", f"{prefix}.q_weight")
        perm = dict(perm=[0, 2, 1, 3])

        def heads_first(t, n, d):  # [T, n*d] -> [B, n, S, d]
            return g.op("Transpose", [g.op("Reshape", [t, g.op("Concat", [dims, g.const([n, d], np.int64)], axis=0)])], **perm)

        q_nope, q_rot = g.op("Split", [heads_first(q, heads, qk), g.const([nope, rope], np.int64)], 2, axis=-1)
        compressed = self.projection(x, f"{module}.kv_a_proj_with_mqa", f"{prefix}.kv_a")
        latent, k_rot = g.op("Split", [compressed, g.const([lora, rope], np.int64)], 2, axis=-1)
        latent = self.rms_norm(latent, f"{module}.kv_a_layernorm.weight", attn.kv_a_layernorm.variance_epsilon,
                               f"{prefix}.kv_a_norm")
        kv = heads_first(self.projection(latent, f"{module}.kv_b_proj", f"{prefix}.kv_b"), heads, nope + v_dim)
        k_nope, v = g.op("Split", [kv, g.const([nope, v_dim], np.int64)], 2, axis=-1)
        q_rot = self.mla_rope(q_rot, cos, sin)
        k_rot = self.mla_rope(heads_first(k_rot, 1, rope), cos, sin)                 # one rope key for all heads
        k_rot = g.op("Expand", [k_rot, g.const([1, heads, 1, 1], np.int64)])
        q = g.op("Concat", [q_nope, q_rot], axis=-1)
        k = g.op("Concat", [k_nope, k_rot], axis=-1)

        def padded(t, d):  # the cache keeps one head width for keys and values
            if d == width:
                return t
            pad = g.op("Mul", [g.op("Slice", [t, g.const([0], np.int64), g.const([1], np.int64), g.const([-1], np.int64)]),
                               g.const(0.0)])
            return g.op("Concat", [t, g.op("Tile", [pad, g.const([1, 1, 1, width - d], np.int64)])], axis=-1)

        key = g.op("Concat", [past_key, padded(k, qk)], axis=2, name=f"{prefix}/key")
        value = g.op("Concat", [past_value, padded(v, v_dim)], axis=2, name=f"{prefix}/value")

        def narrow(t, d):
            if d == width:
                return t
            return g.op("Slice", [t, g.const([0], np.int64), g.const([d], np.int64), g.const([-1], np.int64)])

        scores = g.op("MatMul", [q, g.op("Transpose", [narrow(key, qk)], perm=[0, 1, 3, 2])])   # [B, H, S, T]
        mask4 = g.op("Squeeze", [mask, g.const([2], np.int64)])                                  # [B, 1, S, T]
        scores = g.op("Add", [g.op("Mul", [scores, g.const(float(attn.scaling))]), mask4])
        out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), narrow(value, v_dim)])      # [B, H, S, v]
        out = g.op("Reshape", [g.op("Transpose", [out], **perm), g.const([-1, heads * v_dim], np.int64)])
        return self.projection(out, f"{module}.o_proj", f"{prefix}.o_weight"), key, value

    # ------------------------------------------------------------------ routed experts
    def _expert_fc1(self, layer_idx: int, expert_idx: int) -> np.ndarray:
        """Gate/up rows interleaved (g0, u0, g1, u1, ...), [2I, H]: the MoE op's fc1 layout."""
        gate_up = self.w.expert(f"{self.arch.experts_module(layer_idx)}.gate_up_proj", expert_idx)
        if self.pieces.experts == "interleaved_cols":        # [H, 2I], columns already interleaved
            return np.ascontiguousarray(gate_up.T)
        inter = gate_up.shape[0] // 2                          # [2I, H]: gate rows, then up rows
        fused = np.empty_like(gate_up)
        fused[0::2], fused[1::2] = gate_up[:inter], gate_up[inter:]
        return fused

    def _expert_fc2(self, layer_idx: int, expert_idx: int) -> np.ndarray:
        """The down projection, [H, I] ([out, in])."""
        down = self.w.expert(f"{self.arch.experts_module(layer_idx)}.down_proj", expert_idx)
        return np.ascontiguousarray(down.T) if self.pieces.experts == "interleaved_cols" else down

    def _expert_gate_up_down(self, layer_idx: int, expert_idx: int) -> tuple[np.ndarray, np.ndarray]:
        return self._expert_fc1(layer_idx, expert_idx), self._expert_fc2(layer_idx, expert_idx)

    def _expert_biases(self, layer_idx: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        experts = self.arch.experts_module(layer_idx)
        names = (f"{experts}.gate_up_proj_bias", f"{experts}.down_proj_bias")
        n = self.n_experts[layer_idx]
        return tuple(np.stack([self.w.expert(name, e) for e in range(n)]).astype(np.float32) if self.w.has(name) else None
                     for name in names)

    def router_logits(self, x: str, layer_idx: int, prefix: str) -> str:
        router = self.arch.router_module(layer_idx)
        name = f"{router}.weight"
        shape = self.w.shape(name)
        n = self.n_experts[layer_idx]
        if shape[0] != n:
            raise OnnxExportError(f"layer {layer_idx}: config says {n} experts but the router has {shape[0]} rows")
        bias = self.w.array(f"{router}.bias") if self.w.has(f"{router}.bias") else None
        return self.linear(x, f"{prefix}.router", shape, [self.w.array(name)], bias, keep_fp32=True)

    def moe(self, x: str, layer_idx: int) -> str:
        g = self.g
        prefix = f"layers.{layer_idx}.mlp"
        n = self.n_experts[layer_idx] = self.w.n_experts(layer_idx)
        if n < self.layer_k[layer_idx]:
            raise OnnxExportError(f"layer {layer_idx} keeps {n} experts, fewer than its top-k {self.layer_k[layer_idx]}")
        kind = self.arch.routing_kind
        if kind not in ("softmax_topk", "topk_softmax", "sigmoid_group"):
            raise OnnxExportError(f"routing {kind!r} ({self.arch.family}) is not supported by the ONNX exporter yet")
        logits = self.router_logits(x, layer_idx, prefix)
        self.record.kept_fp32.append(f"{prefix}.router")
        normalize = True if kind == "topk_softmax" else self.routing.renorm
        fc1_bias, fc2_bias = self._expert_biases(layer_idx)
        dense = self.sigmoid_group_weights(logits, layer_idx, prefix) if kind == "sigmoid_group" else None
        if self.formulation == "contrib" and dense is not None:
            # the op's softmax over log-weights (very negative where not chosen) gives weight / sum
            # for exactly the k chosen experts; the sum multiplies the output back
            minimum = g.const(-1e30)
            log_weights = g.op("Where", [g.op("Greater", [dense, g.const(0.0)]), g.op("Log", [dense]), minimum],
                               name=f"{prefix}/log_routing_weights")
            out = self._moe_contrib(x, log_weights, layer_idx, prefix, False, fc1_bias, fc2_bias)
            out = g.op("Mul", [out, g.op("ReduceSum", [dense, g.const([-1], np.int64)], keepdims=1)])
        elif self.formulation == "contrib":
            out = self._moe_contrib(x, logits, layer_idx, prefix, normalize, fc1_bias, fc2_bias)
        else:
            out = self._moe_standard(x, logits, layer_idx, prefix, kind, normalize, fc1_bias, fc2_bias, dense)
        if self.pieces.shared == "sigmoid_gated":
            block = self.arch.moe_block_module(layer_idx)
            shared = self.dense_mlp(x, f"{block}.{self.pieces.shared_module}", f"{prefix}.shared")
            gate = self.projection(x, f"{block}.{self.pieces.shared_gate_module}", f"{prefix}.shared_gate", keep_fp32=True)
            self.record.kept_fp32.append(f"{prefix}.shared_gate")
            out = g.op("Add", [out, g.op("Mul", [shared, g.op("Sigmoid", [gate])])])
        elif self.pieces.shared == "plain":
            block = self.arch.moe_block_module(layer_idx)
            out = g.op("Add", [out, self.dense_mlp(x, f"{block}.{self.pieces.shared_module}", f"{prefix}.shared")])
        return out

    def sigmoid_group_weights(self, logits: str, layer_idx: int, prefix: str) -> str:
        """DeepSeek-V3 routing as a dense [T, E] weight matrix (zero where not chosen): sigmoid
        scores; selection on scores + e_score_correction_bias, limited to the topk_group groups
        with the best sum of their top group_score_top biased scores; weights are the unbiased
        scores of the chosen, renormalised (norm_topk_prob) and times routed_scaling_factor."""
        g = self.g
        n = self.n_experts[layer_idx]
        n_group, topk_group, group_top = self.routing.n_group, self.routing.topk_group, self.routing.group_score_top
        if n % n_group:
            raise OnnxExportError(f"layer {layer_idx}: {n} experts do not split into {n_group} equal routing groups")
        size = n // n_group
        top_k = self.layer_k[layer_idx]
        if size < group_top or topk_group * size < top_k:
            raise OnnxExportError(f"layer {layer_idx}: {size} experts per routing group cannot serve group-limited "
                                  f"top-{top_k} (topk_group {topk_group}, group score from the top {group_top})")
        scores = g.op("Sigmoid", [logits])
        bias_name = f"{self.arch.router_module(layer_idx)}.e_score_correction_bias"
        choice = scores
        if self.w.has(bias_name):
            choice = g.op("Add", [scores, g.small_weight(f"{prefix}.score_bias", self.w.array(bias_name).astype(np.float32))])
        grouped = g.op("Reshape", [choice, g.const([-1, n_group, size], np.int64)])
        best, _ = g.op("TopK", [grouped, g.const([group_top], np.int64)], 2, axis=-1)
        group_scores = g.op("ReduceSum", [best, g.const([-1], np.int64)], keepdims=0)          # [T, G]
        top_groups, group_idx = g.op("TopK", [group_scores, g.const([topk_group], np.int64)], 2, axis=-1)
        ones = g.op("Add", [g.op("Mul", [top_groups, g.const(0.0)]), g.const(1.0)])
        group_mask = g.op("ScatterElements", [g.op("Mul", [group_scores, g.const(0.0)]), group_idx, ones], axis=1)
        expert_mask = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [group_mask, g.const([-1], np.int64)]),
                                                        g.const([1, 1, size], np.int64)]), g.const([-1, n], np.int64)])
        choice = g.op("Where", [g.op("Greater", [expert_mask, g.const(0.0)]), choice, g.const(float("-inf"))])
        _, idx = g.op("TopK", [choice, g.const([top_k], np.int64)], 2, axis=-1)
        weights = g.op("GatherElements", [scores, idx], axis=1)
        if self.routing.renorm:
            total = g.op("Add", [g.op("ReduceSum", [weights, g.const([-1], np.int64)], keepdims=1), g.const(1e-20)])
            weights = g.op("Div", [weights, total])
        weights = g.op("Mul", [weights, g.const(self.routing.scaling)])
        return g.op("ScatterElements", [g.op("Mul", [scores, g.const(0.0)]), idx, weights], axis=1,
                    name=f"{prefix}/routing_weights")

    def _moe_contrib(self, x, logits, layer_idx, prefix, normalize, fc1_bias, fc2_bias) -> str:
        g = self.g
        n = self.n_experts[layer_idx]
        (rows1, cols1), (rows2, cols2) = self._expert_fc1(layer_idx, 0).shape, self._expert_fc2(layer_idx, 0).shape
        attrs = dict(k=self.layer_k[layer_idx], activation_type="swiglu", swiglu_fusion=1,
                     normalize_routing_weights=int(normalize), activation_alpha=1.0, activation_beta=0.0)
        if self.pieces.activation == "gpt_oss":
            attrs.update(activation_alpha=float(getattr(self.text_config, "swiglu_alpha", 1.702)), activation_beta=1.0,
                         swiglu_limit=float(getattr(self.text_config, "swiglu_limit", 7.0)))

        def experts(part):
            read = self._expert_fc1 if part == 0 else self._expert_fc2
            for e in range(n):
                yield read(layer_idx, e)

        bias1 = g.small_weight(f"{prefix}.fc1_bias", fc1_bias) if fc1_bias is not None else ""
        bias2 = g.small_weight(f"{prefix}.fc2_bias", fc2_bias) if fc2_bias is not None else ""
        if self.quant == "fp32" or self.quant not in ("int8", "int4"):
            fc1 = self.linear.float_weight(f"{prefix}.fc1", (n, rows1, cols1), experts(0))
            fc2 = self.linear.float_weight(f"{prefix}.fc2", (n, rows2, cols2), experts(1))
            return g.op("MoE", [x, logits, fc1, bias1, fc2, bias2], name=f"{prefix}/moe", domain=CONTRIB_DOMAIN, **attrs)
        bits = 8 if self.quant == "int8" else 4
        block = None
        if bits == 4:
            block = next((size for size in INT4_BLOCK_SIZES if cols1 % size == 0 and cols2 % size == 0), None)
            if block is None:
                raise OnnxExportError(f"layer {layer_idx}: expert widths {cols1}/{cols2} admit no 4-bit block size "
                                      f"({INT4_BLOCK_SIZES}); export with --quant int8")
        names = {}
        for part, base, (rows, cols) in ((0, f"{prefix}.fc1", (rows1, cols1)), (1, f"{prefix}.fc2", (rows2, cols2))):
            scales = []

            def packed(part=part, scales=scales):
                for weight in experts(part):
                    codes, scale = quantize_rows(weight[None], bits, block)
                    scales.append(scale[0])
                    yield codes[0]

            q = g.weight(f"{base}.q{bits}", np.uint8, (n, rows, cols * bits // 8), packed())
            s = g.small_weight(f"{base}.scales", np.stack(scales))
            names[part] = (q, s)
            self.record.tensors[base] = {"op": "QMoE", "bits": bits, "block_size": block or "per-row"}
        extra = {"block_size": block} if block else {}
        return g.op("QMoE", [x, logits, names[0][0], names[0][1], bias1, names[1][0], names[1][1], bias2],
                    name=f"{prefix}/qmoe", domain=CONTRIB_DOMAIN, expert_weight_bits=bits, weights_prepacked=0, **attrs, **extra)

    def _moe_standard(self, x, logits, layer_idx, prefix, kind, normalize, fc1_bias, fc2_bias, dense=None) -> str:
        """Standard ONNX ops: routing weights as a dense [T, E] matrix (zero where not chosen),
        then per expert either only the tokens that chose it ("sparse": NonZero, Gather,
        ScatterND add) or every token ("dense")."""
        g = self.g
        n = self.n_experts[layer_idx]
        k = g.const([self.layer_k[layer_idx]], np.int64)
        if dense is not None:  # precomputed (sigmoid_group)
            pass
        elif kind == "topk_softmax":
            values, indices = g.op("TopK", [logits, k], 2, axis=-1)
            weights = g.op("Softmax", [values], axis=-1)
        else:
            values, indices = g.op("TopK", [g.op("Softmax", [logits], axis=-1), k], 2, axis=-1)
            weights = g.op("Div", [values, g.op("ReduceSum", [values, g.const([-1], np.int64)], keepdims=1)]) if normalize else values
        if dense is None:
            dense = g.op("ScatterElements", [g.op("Mul", [logits, g.const(0.0)]), indices, weights], axis=1,
                         name=f"{prefix}/routing_weights")
        out = g.op("Mul", [x, g.const(0.0)])
        for e in range(n):
            gate_up, down = self._expert_gate_up_down(layer_idx, e)
            w = g.op("Gather", [dense, g.const(e, np.int64)], axis=1)                     # [T]
            if self.formulation == "sparse":
                rows = g.op("Squeeze", [g.op("NonZero", [g.op("Greater", [w, g.const(0.0)])]), g.const([0], np.int64)])
                tokens, w = g.op("Gather", [x, rows], axis=0), g.op("Gather", [w, rows], axis=0)
            else:
                tokens = x
            eprefix = f"{prefix}.experts.{e}"
            b1 = fc1_bias[e] if fc1_bias is not None else None
            gate = self.linear(tokens, f"{eprefix}.gate", gate_up[0::2].shape, [gate_up[0::2]], None if b1 is None else b1[0::2])
            up = self.linear(tokens, f"{eprefix}.up", gate_up[1::2].shape, [gate_up[1::2]], None if b1 is None else b1[1::2])
            y = self.linear(self.gated(gate, up), f"{eprefix}.down", down.shape, [down],
                            None if fc2_bias is None else fc2_bias[e])
            y = g.op("Mul", [y, g.op("Unsqueeze", [w, g.const([1], np.int64)])])
            if self.formulation == "sparse":
                out = g.op("ScatterND", [out, g.op("Unsqueeze", [rows, g.const([1], np.int64)]), y], reduction="add")
            else:
                out = g.op("Add", [out, y])
        return out

    # ------------------------------------------------------------------ embeddings and head
    def embedding(self, input_ids: str, name: str) -> str:
        g = self.g
        shape = self.w.shape(name)
        if self.quant == "fp32":
            table = self.linear.float_weight("embed", shape, self.w.row_chunks(name))
            self._embed_table = table
            return g.op("Gather", [table, input_ids], axis=0, name="embed_lookup")
        vocab, hidden = shape
        if self.quant == "int8":
            scales = []

            def codes():
                for chunk in self.w.row_chunks(name):
                    packed, scale = quantize_rows(chunk[None], 8, None)
                    scales.append(scale[0])
                    yield (packed[0].astype(np.int16) - 128).astype(np.int8)

            table = g.weight("embed.q8", np.int8, shape, codes())
            scale = g.small_weight("embed.scales", np.concatenate(scales))
            rows = g.op("Cast", [g.op("Gather", [table, input_ids], axis=0)], to=TensorProto.FLOAT)
            self.record.tensors["embed"] = {"op": "Gather+Mul", "bits": 8, "block_size": "per-row"}
            return g.op("Mul", [rows, g.op("Unsqueeze", [g.op("Gather", [scale, input_ids], axis=0), g.const([-1], np.int64)])],
                        name="embed_lookup")
        block = _block_size(hidden)
        scales = []

        def packed():
            for chunk in self.w.row_chunks(name):
                codes, scale = quantize_rows(chunk[None], 4, block)
                scales.append(scale[0])
                yield codes[0]

        table = g.weight("embed.q4", np.uint8, (vocab, hidden // 2), packed())
        scale = g.small_weight("embed.scales", np.concatenate(scales))
        self.record.tensors["embed"] = {"op": "GatherBlockQuantized", "bits": 4, "block_size": block}
        return g.op("GatherBlockQuantized", [table, input_ids, scale], name="embed_lookup", domain=CONTRIB_DOMAIN,
                    bits=4, block_size=block, gather_axis=0, quantize_axis=1)

    def lm_head(self, x: str, embed_name: str) -> str:
        head = "lm_head.weight"
        tied = not self.w.has(head) or self.w.same_storage(head, embed_name)
        if self.quant == "fp32" and tied:
            return self.g.op("Gemm", [x, self._embed_table], name="lm_head", transB=1)  # tied: one table, read both ways
        source = embed_name if tied else head  # quantized exports keep a second table (MatMul layout)
        return self.linear(x, "lm_head", self.w.shape(source), self.w.row_chunks(source))

    # ------------------------------------------------------------------ the graph
    def build(self, progress=None) -> GraphShape:
        g = self.g
        n_layers = self.w.n_layers
        vocab = self.w.shape("model.embed_tokens.weight")[0]
        g.input(INPUT_IDS, TensorProto.INT64, ["batch", "sequence"])
        g.input(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence"])
        g.input(POSITION_IDS, TensorProto.INT64, ["batch", "sequence"])
        pasts = past_names(n_layers)
        for name in pasts:
            g.input(name, TensorProto.FLOAT, ["batch", self.n_kv_heads, "past_sequence", self.head_dim])
        batch_seq = g.op("Shape", [INPUT_IDS], name="batch_seq")                       # [B, S]
        seq = g.op("Shape", [INPUT_IDS], start=1, end=2)
        past_len = g.op("Shape", [pasts[0]], start=2, end=3)
        embed_name = "model.embed_tokens.weight"
        x = g.op("Reshape", [self.embedding(INPUT_IDS, embed_name), g.const([-1, self.hidden], np.int64)])
        cos, sin = self.rotary_tables(POSITION_IDS)
        masks = self.masks(ATTENTION_MASK, seq, past_len)
        presents = []
        for layer_idx in range(n_layers):
            layer = self.w.skeleton.model.layers[layer_idx]
            base = f"model.layers.{layer_idx}"
            h = self.rms_norm(x, f"{base}.input_layernorm.weight", layer.input_layernorm.variance_epsilon,
                              f"layers.{layer_idx}.input_norm")
            attn, key, value = self.attention(h, layer_idx, cos, sin, masks[self.window_of(layer_idx)], batch_seq,
                                              pasts[2 * layer_idx], pasts[2 * layer_idx + 1])
            presents += [key, value]
            x = g.op("Add", [x, attn])
            h = self.rms_norm(x, f"{base}.post_attention_layernorm.weight", layer.post_attention_layernorm.variance_epsilon,
                              f"layers.{layer_idx}.post_norm")
            if layer_idx in self.moe_layers:
                h = self.moe(h, layer_idx)
            else:
                h = self.dense_mlp(h, f"{base}.mlp", f"layers.{layer_idx}.mlp")
            x = g.op("Add", [x, h], name=f"layers.{layer_idx}/out")
            if progress is not None:
                progress(layer_idx, n_layers)
            from packager.core.layer_stream import release_freed_memory

            release_freed_memory()
        norm = self.w.skeleton.model.norm
        x = self.rms_norm(x, "model.norm.weight", norm.variance_epsilon, "norm")
        logits = self.lm_head(x, embed_name)
        logits = g.op("Reshape", [logits, g.op("Concat", [batch_seq, g.const([vocab], np.int64)], axis=0)])
        g.output(logits, LOGITS, TensorProto.FLOAT, ["batch", "sequence", vocab])
        for value, name in zip(presents, present_names(n_layers)):
            g.output(value, name, TensorProto.FLOAT, ["batch", self.n_kv_heads, "total_sequence", self.head_dim])
        return GraphShape(n_layers=n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                          hidden_size=self.hidden, vocab_size=vocab, n_experts=dict(self.n_experts), top_k=self.top_k,
                          top_k_per_layer=dict(self.layer_k))
