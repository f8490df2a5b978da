"""Weight quantization of an exported decoder graph, experts included.

- int8: onnxruntime's dynamic quantization (int8 weights, activations quantized per call)
  for the MatMuls with constant weights; the contrib MoE nodes become QMoE with 8-bit
  per-row expert weights.
- int4: onnxruntime's weight-only 4-bit MatMulNBits for the MatMuls (block-wise, symmetric);
  the contrib MoE nodes become QMoE with 4-bit block-wise expert weights.

Routers stay fp32 (DESIGN.md: the same fingerprint identifies every export, and a quantized
router would change which experts run). The record returned says which tensor went through
which op, so the export config can tell the user exactly what was quantized.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters.onnx.errors import OnnxExportError
from converters.onnx.options import QUANT_TYPES

CONTRIB_DOMAIN = "com.microsoft"

logger = logging.getLogger(__name__)

INT4_BLOCK_SIZES = (32, 16)  # preferred first; QMoE needs a power of two >= 16 dividing H and I
MATMUL_INT4_BLOCK_SIZE = 32
PROTOBUF_SAFE_BYTES = 1536 * 1024**2  # a single protobuf cannot exceed 2 GiB


def check_quant(quant: str) -> str:
    if quant not in QUANT_TYPES:
        raise OnnxExportError(f"quantization {quant!r} is not supported; choose one of {', '.join(QUANT_TYPES)}")
    return quant


# ------------------------------------------------------------------------------------- QMoE
def quantize_rows(weight: np.ndarray, bits: int, block_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of [E, N, K] along K -> (packed uint8 [E, N, K*bits/8], scales).

    Codes are stored unsigned with the op's implicit zero point 2^(bits-1); 4-bit codes are
    packed two per byte, the even element in the low nibble. Scales are [E, N] per row, or
    [E, N, K/block_size] per block."""
    n_experts, rows, cols = weight.shape
    groups = 1 if block_size is None else cols // block_size
    grouped = weight.astype(np.float32).reshape(n_experts, rows, groups, cols // groups)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(grouped).max(axis=-1, keepdims=True)
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint(grouped / scales), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    codes = codes.reshape(n_experts, rows, cols).astype(np.uint8)
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = scales.reshape(n_experts, rows, groups)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales[..., 0] if block_size is None else scales)


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, bits: int, block_size: int | None) -> np.ndarray:
    """Inverse of quantize_rows (the reference the QMoE op is tested against)."""
    if bits == 4:
        codes = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int16)
        codes[..., 0::2] = packed & 0x0F
        codes[..., 1::2] = packed >> 4
    else:
        codes = packed.astype(np.int16)
    values = (codes - 2 ** (bits - 1)).astype(np.float32)
    if block_size is None:
        return values * scales[..., None]
    n_experts, rows, cols = values.shape
    return (values.reshape(n_experts, rows, cols // block_size, block_size) * scales[..., None]).reshape(values.shape)


def _moe_block_size(hidden: int, inter: int) -> int | None:
    for size in INT4_BLOCK_SIZES:
        if hidden % size == 0 and inter % size == 0:
            return size
    return None


def moe_to_qmoe(model: onnx.ModelProto, bits: int) -> dict[str, dict]:
    """Replace every com.microsoft MoE node by QMoE with `bits`-bit expert weights, in place."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    record: dict[str, dict] = {}
    new_nodes = []
    for node in graph.node:
        if node.domain != CONTRIB_DOMAIN or node.op_type != "MoE":
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        fc1_name, fc2_name = node.input[2], node.input[4]
        fc1 = numpy_helper.to_array(initializers[fc1_name])
        fc2 = numpy_helper.to_array(initializers[fc2_name])
        hidden, inter = fc1.shape[2], fc2.shape[2]
        block_size = _moe_block_size(hidden, inter) if bits == 4 else None
        q1, s1 = quantize_rows(fc1, bits, block_size)
        q2, s2 = quantize_rows(fc2, bits, block_size)
        names = {}
        for base, packed, scale in ((fc1_name, q1, s1), (fc2_name, q2, s2)):
            names[base] = (f"{base}.q{bits}", f"{base}.scales")
            graph.initializer.append(numpy_helper.from_array(packed, names[base][0]))
            graph.initializer.append(numpy_helper.from_array(scale, names[base][1]))
            record[base] = {"op": "QMoE", "bits": bits, "block_size": block_size or "per-row"}
        extra = {"block_size": block_size} if block_size else {}
        new_nodes.append(helper.make_node(
            "QMoE",
            [node.input[0], node.input[1], names[fc1_name][0], names[fc1_name][1], "",
             names[fc2_name][0], names[fc2_name][1]],
            list(node.output), name=f"{node.name}_q{bits}", domain=CONTRIB_DOMAIN,
            expert_weight_bits=bits, weights_prepacked=0, **attrs, **extra,
        ))
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(model)
    return record


def gather_to_block_quantized(model: onnx.ModelProto, bits: int, block_size: int) -> dict[str, dict]:
    """Embedding lookups (Gather on axis 0 of a constant [V, H] table) -> GatherBlockQuantized
    with `bits`-bit codes in uint8, block-wise along H, in place.

    Written here rather than by onnxruntime's 4-bit quantizer, which stores int4 tensors and so
    forces opset 21 onto a graph exported at a lower opset (invalid ReduceMean afterwards)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    record: dict[str, dict] = {}
    new_nodes = []
    for node in graph.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        table = initializers.get(node.input[0]) if node.op_type == "Gather" and node.domain == "" else None
        if table is None or axis != 0 or len(table.dims) != 2 or table.dims[1] % block_size:
            new_nodes.append(node)
            continue
        packed, scales = quantize_rows(numpy_helper.to_array(table)[None], bits, block_size)
        data_name, scale_name = f"{table.name}.q{bits}", f"{table.name}.scales"
        graph.initializer.append(numpy_helper.from_array(packed[0], data_name))
        graph.initializer.append(numpy_helper.from_array(scales[0], scale_name))
        new_nodes.append(helper.make_node(
            "GatherBlockQuantized", [data_name, node.input[1], scale_name], list(node.output),
            name=f"{node.name}_q{bits}", domain=CONTRIB_DOMAIN, bits=bits, block_size=block_size,
            gather_axis=0, quantize_axis=1,
        ))
        record[table.name] = {"op": "GatherBlockQuantized", "bits": bits, "block_size": block_size}
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(model)
    return record


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {out.name for out in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# ------------------------------------------------------------------------------------ MatMuls
def _matmuls_reading(model: onnx.ModelProto, names: set[str]) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and set(node.input) & names]


def _record_matmuls(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, dict]:
    """Which fp32 weights disappeared, and which op now reads their quantized form."""
    old = {init.name for init in before.graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    new_inits = {init.name for init in after.graph.initializer}
    consumers = {}
    for node in after.graph.node:
        for name in node.input:
            consumers.setdefault(name, node.op_type)
    record = {}
    for name in sorted(old - new_inits):
        derived = [n for n in new_inits if n.startswith(name + "_") or n.startswith(name + ".")]
        ops = sorted({consumers.get(n, "?") for n in derived} - {"?"})
        record[name] = {"op": "+".join(ops) or "removed"}
    return record


@contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer warns on the root logger ("consider pre-processing"), advice
    for CNN calibration that does not apply to weight quantization of a decoder."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_model(model: onnx.ModelProto, quant: str, keep_fp32: set[str], work_dir: Path) -> tuple[onnx.ModelProto, dict]:
    """Quantize `model` (an fp32 export) to `quant`; initializers in `keep_fp32` are not touched."""
    check_quant(quant)
    if quant == "fp32":
        return model, {"type": "fp32", "tensors": {}}
    before = onnx.ModelProto()
    before.CopyFrom(model)
    bits = 8 if quant == "int8" else 4
    own_record = moe_to_qmoe(model, bits)
    if bits == 4:
        own_record.update(gather_to_block_quantized(model, bits, MATMUL_INT4_BLOCK_SIZE))
    excluded = _matmuls_reading(model, keep_fp32)
    if quant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp_dir = Path(tempfile.mkdtemp(prefix="int8-", dir=work_dir))  # the quantizer may add data files
        try:
            large = sum(len(init.raw_data) for init in model.graph.initializer) > PROTOBUF_SAFE_BYTES
            with _quiet_root_logger():
                quantize_dynamic(model, tmp_dir / "model.onnx", op_types_to_quantize=["MatMul", "Gather"], per_channel=False,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=large,
                                 extra_options={"MatMulConstBOnly": True})
            quantized = onnx.load(str(tmp_dir / "model.onnx"))
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        method = {"matmul": "onnxruntime.quantization.quantize_dynamic (QInt8 weights, per-tensor, dynamic uint8 activations)",
                  "embedding": "int8 per-tensor table + DequantizeLinear after the Gather",
                  "experts": "com.microsoft QMoE, 8-bit symmetric per-row"}
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=MATMUL_INT4_BLOCK_SIZE, is_symmetric=True,
                                         nodes_to_exclude=excluded, op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantized = quantizer.model.model
        method = {"matmul": f"com.microsoft MatMulNBits, 4-bit symmetric, block {MATMUL_INT4_BLOCK_SIZE} (weight-only)",
                  "embedding": f"com.microsoft GatherBlockQuantized, 4-bit, block {MATMUL_INT4_BLOCK_SIZE} along the hidden axis",
                  "experts": "com.microsoft QMoE, 4-bit symmetric block-wise (weight-only)"}
    tensors = {**_record_matmuls(before, quantized), **own_record}
    # matrices left in fp32 besides the routers (e.g. the embedding table read by Gather)
    still_fp32 = sorted(
        init.name for init in quantized.graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2 and init.name not in keep_fp32
        and not any(init.name.startswith(name) for name in tensors)  # scales of quantized tensors
    )
    return quantized, {
        "type": quant,
        "method": method,
        "tensors": tensors,
        "kept_fp32": sorted(keep_fp32),
        "other_fp32_initializers": still_fp32,
    }
