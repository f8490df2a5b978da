"""Quantized parents as they are published: which tensors make up one quantized linear layer,
how to check them, and how to dequantise them exactly (numpy, no transformers quantizer).

A checkpoint's `quantization_config.quant_method` selects one `QuantScheme`:

    none / mxfp4        no per-linear companions (GPT-OSS MXFP4 experts are fused tensors that
                        packager/core/arch and packager/core/mxfp4.py describe)
    fp8                 `W.weight` F8_E4M3 [out, in] + `W.weight_scale_inv` F32 (or UE8M0) per
                        block of `weight_block_size` (a ceil grid: the last block may be partial,
                        as in DeepSeek-V3) or one per tensor; dequantised = fp8 value x scale
    gptq                `W.qweight` I32 [in*bits/32, out], `W.qzeros` I32 [groups, out*bits/32],
                        `W.scales` F16 [groups, out], `W.g_idx` I32 [in] (act-order included);
                        checkpoint_format gptq stores zero - 1, gptq_v2 the zero itself
    awq                 `W.qweight` I32 [in, out/8] (AutoAWQ GEMM nibble order), `W.qzeros`,
                        `W.scales` [in/group, out]; 4 bits only
    compressed-tensors  pack-quantized (`W.weight_packed` I32 [out, in*bits/32], `W.weight_scale`
                        [out, groups], `W.weight_shape`), int-quantized / naive-quantized (I8
                        `W.weight` + `W.weight_scale`), float-quantized (F8 `W.weight` +
                        `W.weight_scale`); symmetric schemes only

Every quantized linear is seen by the rest of the project under its logical name `W.weight`
(the name an unquantized checkpoint would use); `QuantLinear.parts` lists the tensors on disk
that travel with it, so pruning renames and slices all of them with their expert."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packager.core.errors import CheckpointError

# methods whose linear layers the packager dequantises itself (calibration streams them)
DEQUANTIZED_HERE = ("fp8", "gptq", "awq", "compressed-tensors")
KNOWN_METHODS = ("mxfp4",) + DEQUANTIZED_HERE
_CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
# config lists of module names that may name expert modules by index (rewritten by prune)
MODULE_LIST_KEYS = ("modules_to_not_convert", "ignore", "ignored_layers")


# ----------------------------------------------------------------------------- element decoding
def _fp8_e4m3_table() -> np.ndarray:
    """float32 value of each e4m3fn byte (bias 7, no infinities, S.1111.111 = NaN)."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = ((codes >> 3) & 0x0F).astype(np.int32)
    mantissa = (codes & 0x07).astype(np.float64)
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8.0) * 2.0 ** -6
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


def _fp8_e5m2_table() -> np.ndarray:
    """e5m2 is the high byte of an IEEE half: widen bit-wise."""
    return (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)


FP8_TABLES = {"F8_E4M3": _fp8_e4m3_table(), "F8_E5M2": _fp8_e5m2_table()}

_PLAIN = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def decode(raw, dtype: str, shape: Iterable[int], name: str = "") -> np.ndarray:
    """Exact numpy values of stored tensor bytes: floats (BF16 / FP8 / UE8M0 included) as
    float32, integers as their own type."""
    shape = tuple(shape)
    buffer = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
    if dtype == "BF16":
        return (buffer.view("<u2").astype(np.uint32) << 16).view("<f4").reshape(shape)
    if dtype in FP8_TABLES:
        return FP8_TABLES[dtype][buffer].reshape(shape)
    if dtype == "F8_E8M0":  # power-of-two scales: 2^(code - 127); 0xFF is NaN
        values = np.ldexp(np.ones(buffer.shape, dtype=np.float32), buffer.astype(np.int32) - 127)
        values[buffer == 0xFF] = np.nan
        return values.reshape(shape)
    if dtype not in _PLAIN:
        raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be decoded")
    values = buffer.view(_PLAIN[dtype]).reshape(shape)
    return values.astype(np.float32) if dtype in ("F64", "F16") else values


def _unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned `bits`-bit fields of int32 words, low bits first, spread along `axis`."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    words = words.view(np.uint32)
    fields = (np.expand_dims(words, axis + 1) >> shifts.reshape((1,) * (axis + 1) + (per_word,) + (1,) * (words.ndim - axis - 1)))
    fields &= np.uint32((1 << bits) - 1)
    shape = list(words.shape)
    shape[axis] *= per_word
    return fields.reshape(shape).astype(np.int32)


# ----------------------------------------------------------------------------- the scheme
@dataclass(frozen=True)
class QuantScheme:
    """The quantization of a checkpoint, from config.json `quantization_config`."""

    method: str                                  # "none", "mxfp4", "fp8", "gptq", "awq", "compressed-tensors"
    source: str = "config.json"
    config: dict = field(default_factory=dict)   # the quantization_config as read
    block: tuple[int, int] | None = None         # fp8 weight_block_size
    bits: int | None = None
    group_size: int | None = None
    fmt: str | None = None                       # gptq checkpoint_format / compressed-tensors format
    primary: str = "weight"                      # suffix of the tensor that marks a quantized linear
    required: tuple[str, ...] = ()               # companions every quantized linear has
    optional: tuple[str, ...] = ()               # companions it may have

    @property
    def dequantized_here(self) -> bool:
        return self.method in DEQUANTIZED_HERE

    @property
    def label(self) -> str:
        if self.method == "compressed-tensors":
            return f"compressed-tensors {self.fmt}"
        if self.method in ("gptq", "awq"):
            return f"{self.method} int{self.bits}"
        return self.method

    def suffixes(self) -> tuple[str, ...]:
        """Every tensor-name suffix a linear layer `W` may have on disk (`W.<suffix>`)."""
        return tuple(dict.fromkeys(("weight", self.primary) + self.required + self.optional))

    # -- one linear -----------------------------------------------------------------------------
    def linear(self, reader, logical: str) -> QuantLinear | None:
        """The quantized linear whose logical weight name is `logical` (`W.weight`), checked;
        None when it is stored unquantized. Raises CheckpointError naming what is wrong."""
        if not self.dequantized_here or not logical.endswith(".weight"):
            return None
        module = logical[: -len(".weight")]
        primary = f"{module}.{self.primary}"
        if primary not in reader:
            orphans = [f"{module}.{s}" for s in self.required if f"{module}.{s}" in reader]
            if orphans:
                raise CheckpointError(f"{reader.model_dir}: {orphans[0]!r} has no {primary!r} ({self.label} checkpoint); "
                                      "the checkpoint is incomplete")
            return None
        info = reader.info(primary)
        if self.primary == "weight" and not self._is_quantized_dtype(info.dtype):
            stray = [f"{module}.{s}" for s in self.required if f"{module}.{s}" in reader]
            if stray:
                raise CheckpointError(f"{info.path}: {primary!r} is {info.dtype} but has the {self.label} scale {stray[0]!r}; "
                                      "the checkpoint mixes formats")
            return None  # a module left unquantized (modules_to_not_convert / ignore)
        parts = {self.primary: primary}
        for suffix in self.required:
            name = f"{module}.{suffix}"
            if name not in reader:
                raise CheckpointError(f"{info.path}: {primary!r} ({self.label}) has no {suffix} tensor {name!r}; "
                                      "the checkpoint is incomplete: re-copy or re-download it")
            parts[suffix] = name
        for suffix in self.optional:
            if f"{module}.{suffix}" in reader:
                parts[suffix] = f"{module}.{suffix}"
        linear = QuantLinear(self, logical, parts, {s: reader.info(n) for s, n in parts.items()}, reader.model_dir)
        linear.check()
        return linear

    def _is_quantized_dtype(self, dtype: str) -> bool:
        if self.method == "fp8":
            return dtype.startswith("F8_")
        return dtype.startswith("F8_") or dtype in ("I8", "U8")  # compressed-tensors int / float-quantized

    def logical_names(self, reader) -> dict[str, QuantLinear | None]:
        """Every tensor name as the rest of the project sees it: quantized linears under their
        logical `W.weight` (with their QuantLinear), every other tensor as itself (None)."""
        names: dict[str, QuantLinear | None] = {}
        claimed: set[str] = set()
        if self.dequantized_here:
            for name in reader.names():
                if name.endswith("." + self.primary):
                    logical = name[: -len(self.primary)] + "weight"
                    linear = self.linear(reader, logical)
                    if linear is not None:
                        names[logical] = linear
                        claimed.update(linear.parts.values())
        for name in reader.names():
            if name not in claimed and name not in names:
                names[name] = None
        return names


def _require_int(qc: dict, key: str, where: str, allowed: Iterable[int] | None = None, default=None) -> int:
    value = qc.get(key, default)
    if not isinstance(value, int) or (allowed is not None and value not in allowed):
        hint = f" (supported: {', '.join(map(str, allowed))})" if allowed is not None else ""
        raise CheckpointError(f"{where}: quantization_config.{key} = {value!r} is not supported{hint}")
    return value


def scheme_from_config(config: dict, where: str | Path = "config.json") -> QuantScheme:
    """The QuantScheme of a parsed config.json; unknown or unsupported variants are refused
    with one line naming the file and the key."""
    where = str(where)
    qc = config.get("quantization_config")
    if not qc:
        return QuantScheme("none", where)
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object")
    method = str(qc.get("quant_method", "")).lower()
    if method == "mxfp4":
        return QuantScheme("mxfp4", where, dict(qc))
    if method == "fp8":
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise CheckpointError(f"{where}: quantization_config.fmt = {fmt!r} is not supported (fp8 e4m3 only)")
        block = qc.get("weight_block_size")
        if block is not None and (not isinstance(block, list | tuple) or len(block) != 2
                                  or not all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{where}: quantization_config.weight_block_size = {block!r}: expected two positive integers")
        return QuantScheme("fp8", where, dict(qc), block=tuple(block) if block else None,
                           required=("weight_scale_inv",), optional=("input_scale", "activation_scale"))
    if method == "gptq":
        bits = _require_int(qc, "bits", where, (2, 4, 8))
        group = _require_int(qc, "group_size", where, default=-1)
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{where}: quantization_config.checkpoint_format = {fmt!r} is not supported "
                                  "(gptq or gptq_v2; repack marlin/bitblas checkpoints to gptq first)")
        return QuantScheme("gptq", where, dict(qc), bits=bits, group_size=group, fmt=fmt, primary="qweight",
                           required=("qzeros", "scales"), optional=("g_idx",))
    if method == "awq":
        bits = _require_int(qc, "bits", where, (4,), default=qc.get("w_bit"))
        group = _require_int(qc, "group_size", where, default=qc.get("q_group_size"))
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"{where}: AWQ version {version!r} is not supported (gemm packing only)")
        if qc.get("zero_point", True) is not True:
            raise CheckpointError(f"{where}: AWQ without zero points is not supported")
        return QuantScheme("awq", where, dict(qc), bits=bits, group_size=group, fmt=version, primary="qweight",
                           required=("qzeros", "scales"))
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(qc, where)
    raise CheckpointError(
        f"{where}: quantization_config.quant_method = {qc.get('quant_method')!r} is not supported; "
        f"supported: unquantized, {', '.join(KNOWN_METHODS)}"
    )


def _compressed_tensors_scheme(qc: dict, where: str) -> QuantScheme:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config has no config_groups")
    weights = []
    formats = {qc.get("format")}
    for name, group in groups.items():
        scheme = (group or {}).get("weights")
        if scheme is None:
            raise CheckpointError(f"{where}: compressed-tensors group {name!r} quantizes no weights (activation-only "
                                  "schemes are not supported)")
        weights.append(scheme)
        if group.get("format"):
            formats.add(group["format"])
    formats.discard(None)
    if len(formats) != 1 or next(iter(formats)) not in _CT_FORMATS:
        raise CheckpointError(f"{where}: compressed-tensors format {sorted(map(str, formats))} is not supported "
                              f"(one of {', '.join(_CT_FORMATS)})")
    fmt = next(iter(formats))
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size")
    distinct = {tuple(str(w.get(k)) for k in keys) for w in weights}
    if len(distinct) != 1:
        raise CheckpointError(f"{where}: compressed-tensors groups use different weight schemes; one scheme is supported")
    w = weights[0]
    if w.get("symmetric") is False:
        raise CheckpointError(f"{where}: compressed-tensors asymmetric weights (zero points) are not supported")
    strategy = str(w.get("strategy"))
    if strategy not in ("channel", "group", "tensor", "block"):
        raise CheckpointError(f"{where}: compressed-tensors weight strategy {strategy!r} is not supported")
    bits = int(w.get("num_bits") or 0)
    if fmt == "pack-quantized":
        if w.get("type", "int") != "int" or bits not in (2, 4, 8):
            raise CheckpointError(f"{where}: compressed-tensors pack-quantized {w.get('type')} {bits}-bit is not supported "
                                  "(int 2/4/8)")
        return QuantScheme("compressed-tensors", where, dict(qc), bits=bits, group_size=w.get("group_size"), fmt=fmt,
                           primary="weight_packed", required=("weight_scale", "weight_shape"), optional=("weight_g_idx",))
    block = w.get("block_structure")
    return QuantScheme("compressed-tensors", where, dict(qc), bits=bits, group_size=w.get("group_size"), fmt=fmt,
                       block=tuple(block) if block else None, required=("weight_scale",),
                       optional=("weight_g_idx", "input_scale"))


# ----------------------------------------------------------------------------- one quantized linear
@dataclass
class QuantLinear:
    """The tensors of one quantized linear `W` on disk (suffix -> name) and their headers."""

    scheme: QuantScheme
    logical: str                 # W.weight
    parts: dict[str, str]
    infos: dict[str, Any]        # suffix -> packager.core.checkpoint.TensorInfo
    model_dir: Path

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in] of the dequantised weight."""
        return self._shape

    def _fail(self, what: str) -> CheckpointError:
        info = self.infos[self.scheme.primary]
        return CheckpointError(f"{info.path}: {self.logical!r} ({self.scheme.label}): {what}")

    def check(self) -> None:
        """Shapes and dtypes of every part, against each other and the config (headers only)."""
        s = self.scheme
        primary = self.infos[s.primary]
        if s.method == "fp8" or (s.method == "compressed-tensors" and s.fmt != "pack-quantized"):
            if len(primary.shape) != 2:
                raise self._fail(f"expected a 2-D weight, got {list(primary.shape)}")
            self._shape = tuple(primary.shape)
            scale_suffix = "weight_scale_inv" if s.method == "fp8" else "weight_scale"
            scale = self.infos[scale_suffix]
            self._scale_grid(scale, s.block)
        elif s.method == "gptq":
            per_word = 32 // s.bits
            qweight, qzeros, scales = self.infos["qweight"], self.infos["qzeros"], self.infos["scales"]
            if qweight.dtype != "I32" or len(qweight.shape) != 2:
                raise self._fail(f"qweight must be I32 [in*{s.bits}/32, out], got {qweight.dtype}{list(qweight.shape)}")
            n_in, n_out = qweight.shape[0] * per_word, qweight.shape[1]
            self._shape = (n_out, n_in)
            if len(scales.shape) != 2 or scales.shape[1] != n_out:
                raise self._fail(f"scales {list(scales.shape)} do not match {n_out} output features")
            if tuple(qzeros.shape) != (scales.shape[0], math.ceil(n_out / per_word)) or n_out % per_word:
                raise self._fail(f"qzeros {list(qzeros.shape)} do not match scales {list(scales.shape)} at {s.bits} bits")
            if "g_idx" in self.infos:
                if tuple(self.infos["g_idx"].shape) != (n_in,):
                    raise self._fail(f"g_idx {list(self.infos['g_idx'].shape)} does not match {n_in} input features")
            else:
                group = n_in if s.group_size in (None, -1) else s.group_size
                if math.ceil(n_in / group) != scales.shape[0]:
                    raise self._fail(f"group_size {s.group_size} does not give the {scales.shape[0]} groups of scales")
        elif s.method == "awq":
            qweight, qzeros, scales = self.infos["qweight"], self.infos["qzeros"], self.infos["scales"]
            if qweight.dtype != "I32" or len(qweight.shape) != 2:
                raise self._fail(f"qweight must be I32 [in, out/8], got {qweight.dtype}{list(qweight.shape)}")
            n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
            self._shape = (n_out, n_in)
            if s.group_size <= 0 or n_in % s.group_size:
                raise self._fail(f"group_size {s.group_size} does not divide the {n_in} input features")
            groups = n_in // s.group_size
            if tuple(scales.shape) != (groups, n_out) or tuple(qzeros.shape) != (groups, n_out // 8):
                raise self._fail(f"scales {list(scales.shape)} / qzeros {list(qzeros.shape)} do not match "
                                 f"[{groups}, {n_out}] / [{groups}, {n_out // 8}]")
        else:  # compressed-tensors pack-quantized
            packed, scale, shape = self.infos["weight_packed"], self.infos["weight_scale"], self.infos["weight_shape"]
            if packed.dtype != "I32" or len(packed.shape) != 2 or tuple(shape.shape) != (2,):
                raise self._fail(f"weight_packed {packed.dtype}{list(packed.shape)} / weight_shape {list(shape.shape)} "
                                 "are not the pack-quantized layout")
            self._shape = None  # known once weight_shape is read (see dequantize); checked there
            if len(scale.shape) != 2 or scale.shape[0] != packed.shape[0]:
                raise self._fail(f"weight_scale {list(scale.shape)} does not match {packed.shape[0]} output rows")

    def _scale_grid(self, scale, block) -> None:
        out, n_in = self._shape
        if block is None:
            allowed = {(), (1,), (1, 1), (out, 1)} if self.scheme.method != "fp8" else {(), (1,), (1, 1)}
            if self.scheme.method == "compressed-tensors" and len(scale.shape) == 2 and scale.shape[0] == out \
                    and self.scheme.group_size and n_in % self.scheme.group_size == 0 \
                    and scale.shape[1] == n_in // self.scheme.group_size:
                return
            if tuple(scale.shape) not in allowed:
                raise self._fail(f"scale {list(scale.shape)} does not fit weight [{out}, {n_in}] "
                                 f"(strategy {self.scheme.config.get('weight_block_size') or 'per tensor/channel/group'})")
            return
        grid = (math.ceil(out / block[0]), math.ceil(n_in / block[1]))
        if tuple(scale.shape) != grid:
            raise self._fail(f"block size {list(block)} does not fit: a [{out}, {n_in}] weight needs a {list(grid)} "
                             f"scale grid, the checkpoint has {list(scale.shape)}")

    # -- dequantisation -----------------------------------------------------------------------
    def dequantize(self, read: Callable[[str], Any]) -> np.ndarray:
        """float32 [out, in]; `read(name)` returns a tensor's stored bytes (bytes or a uint8 array)."""
        s = self.scheme

        def value(suffix: str) -> np.ndarray:
            info = self.infos[suffix]
            return decode(read(info.name), info.dtype, info.shape, info.name)

        if s.method == "fp8" or (s.method == "compressed-tensors" and s.fmt != "pack-quantized"):
            weight = value(s.primary).astype(np.float32, copy=False)
            scale = value("weight_scale_inv" if s.method == "fp8" else "weight_scale").astype(np.float32, copy=False)
            return self._apply_scale(weight, scale, s.block)
        if s.method == "gptq":
            q = _unpack(value("qweight"), s.bits, axis=0)                       # [in, out]
            zeros = _unpack(value("qzeros"), s.bits, axis=1)                    # [groups, out]
            if s.fmt == "gptq":
                zeros = zeros + 1                                               # v1 stores zero - 1
            scales = value("scales").astype(np.float32)
            n_in = q.shape[0]
            if "g_idx" in self.infos:
                g_idx = value("g_idx").astype(np.int64)
                if g_idx.min() < 0 or g_idx.max() >= scales.shape[0]:
                    raise self._fail(f"g_idx holds group ids outside 0..{scales.shape[0] - 1}")
            else:
                group = n_in if s.group_size in (None, -1) else s.group_size
                g_idx = np.arange(n_in) // group
            weight = (q - zeros[g_idx]).astype(np.float32) * scales[g_idx]
            return np.ascontiguousarray(weight.T)
        if s.method == "awq":
            nibbles = _unpack(value("qweight"), 4, axis=1)                      # packed order
            q = _awq_reorder(nibbles)
            zeros = _awq_reorder(_unpack(value("qzeros"), 4, axis=1))
            scales = value("scales").astype(np.float32)
            g_idx = np.arange(q.shape[0]) // s.group_size
            weight = (q - zeros[g_idx]).astype(np.float32) * scales[g_idx]
            return np.ascontiguousarray(weight.T)
        # compressed-tensors pack-quantized
        out, n_in = (int(v) for v in value("weight_shape"))
        packed = value("weight_packed")
        if packed.shape[0] != out or packed.shape[1] != math.ceil(n_in * s.bits / 32):
            raise self._fail(f"weight_packed {list(packed.shape)} does not hold weight_shape [{out}, {n_in}] at {s.bits} bits")
        q = _unpack(packed, s.bits, axis=1)[:, :n_in] - (1 << (s.bits - 1))     # stored with an offset
        self._shape = (out, n_in)
        scale = value("weight_scale").astype(np.float32)
        if "weight_g_idx" in self.infos:
            g_idx = value("weight_g_idx").astype(np.int64)
            if g_idx.shape != (n_in,) or g_idx.min() < 0 or g_idx.max() >= scale.shape[1]:
                raise self._fail(f"weight_g_idx does not match {n_in} inputs and {scale.shape[1]} groups")
            return q.astype(np.float32) * scale[:, g_idx]
        return self._apply_scale(q.astype(np.float32), scale, None)

    def _apply_scale(self, weight: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
        out, n_in = weight.shape
        if block is not None:
            full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)[:out, :n_in]
            return weight * full
        if scale.size == 1:
            return weight * scale.reshape(())
        if scale.shape == (out, 1):
            return weight * scale
        group = n_in // scale.shape[1]
        if scale.shape[0] != out or group * scale.shape[1] != n_in:
            raise self._fail(f"scale {list(scale.shape)} does not divide weight [{out}, {n_in}] into groups")
        return weight * np.repeat(scale, group, axis=1)


_AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble k of a word holds column 8c + _AWQ_ORDER[k]


def _awq_reorder(nibbles: np.ndarray) -> np.ndarray:
    rows, cols = nibbles.shape
    grouped = nibbles.reshape(rows, cols // 8, 8)
    out = np.empty_like(grouped)
    out[:, :, _AWQ_ORDER] = grouped
    return out.reshape(rows, cols)


# ----------------------------------------------------------------------------- whole checkpoints
def logical_tensors(reader) -> dict[str, QuantLinear | None]:
    """reader.quant.logical_names(reader), cached on the reader."""
    cached = getattr(reader, "_logical_names", None)
    if cached is None:
        cached = reader.quant.logical_names(reader)
        reader._logical_names = cached
    return cached


def logical_shape(reader, name: str) -> tuple[int, ...]:
    linear = logical_tensors(reader).get(name)
    if linear is None:
        return tuple(reader.info(name).shape)
    if linear.shape is None:
        return tuple(int(v) for v in decode(reader.read_bytes(linear.parts["weight_shape"]), "I64", (2,)))
    return linear.shape


def physical_names(reader, name: str) -> list[str]:
    linear = logical_tensors(reader).get(name)
    return [name] if linear is None else list(linear.parts.values())


def read_float32(reader, name: str, read: Callable[[str], Any] | None = None) -> np.ndarray:
    """A logical tensor as float32: a quantized linear dequantised, any float tensor widened."""
    read = read or reader.read_bytes
    linear = logical_tensors(reader).get(name)
    if linear is not None:
        return linear.dequantize(read)
    info = reader.info(name)
    values = decode(read(name), info.dtype, info.shape, name)
    if values.dtype != np.float32:
        raise CheckpointError(f"{info.path}: tensor {name!r} ({info.dtype}) is not a floating-point weight")
    return values


def rename_module_lists(qconfig: dict, rename: Callable[[str], str | None]) -> dict:
    """quantization_config with every module-name list entry passed through `rename` (None
    drops the entry); regular expressions ("re:...") are kept as they are."""
    out = dict(qconfig)
    for key in MODULE_LIST_KEYS:
        value = out.get(key)
        if not isinstance(value, list):
            continue
        renamed = []
        for entry in value:
            if isinstance(entry, str) and not entry.startswith("re:"):
                entry = rename(entry)
            if entry is not None:
                renamed.append(entry)
        out[key] = renamed
    return out


def expert_module_pattern(prefix: str) -> re.Pattern:
    """`prefix` + expert index + optional rest, for module-name lists."""
    return re.compile(re.escape(prefix) + r"(\d+)(\..*)?$")


def write_dequantized(model_dir, out_dir, dtype: str = "float32", progress: bool = False) -> Path:
    """A plain copy of a quantized checkpoint: every quantized linear dequantised to `dtype`
    (float32 exact for fp8 products as the runtimes compute them, and exact for the integer
    formats), every other tensor copied, `quantization_config` removed. Streams one tensor at
    a time and appears atomically. Side files (tokenizer, chat template, pruning.json) are copied."""
    import shutil

    from packager.core.checkpoint import CONFIG_NAME, INDEX_NAME, CheckpointReader, CheckpointWriter, atomic_write_json

    numpy_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if numpy_dtype is None and dtype != "bfloat16":
        raise ValueError(f"dtype {dtype!r}: use float32, bfloat16 or float16")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    with CheckpointReader(model_dir) as reader:
        if not reader.quant.dequantized_here:
            raise CheckpointError(f"{reader.config_path}: not a {'/'.join(DEQUANTIZED_HERE)} checkpoint; nothing to dequantise")
        config = dict(reader.config)
        config.pop("quantization_config", None)
        with CheckpointWriter(out_dir, max_shard_bytes=256 * 1024**2) as writer:
            for name, linear in logical_tensors(reader).items():
                if linear is None:
                    info = reader.info(name)
                    writer.add_ranges(name, info.dtype, info.shape, [(info.path, info.offset, info.nbytes)])
                    continue
                values = linear.dequantize(reader.read_bytes)
                code, raw = _encode(values, dtype)
                writer.add_bytes(name, code, values.shape, raw)
            atomic_write_json(writer.staging_dir / CONFIG_NAME, config)
            for path in sorted(model_dir.iterdir()):
                if path.is_file() and path.name not in (CONFIG_NAME, INDEX_NAME) and path.suffix != ".safetensors":
                    shutil.copy2(path, writer.staging_dir / path.name)
            out = writer.finalize()
    return out


def _encode(values: np.ndarray, dtype: str) -> tuple[str, bytes]:
    if dtype == "float32":
        return "F32", np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype == "float16":
        return "F16", np.ascontiguousarray(values, dtype="<f2").tobytes()
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return "BF16", tensor.view(torch.int16).numpy().tobytes()
