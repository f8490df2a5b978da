"""Weight quantization helpers of the ONNX exporter, applied tensor by tensor while weights
stream (converters/onnx/decoder.py decides which op reads each tensor):

- int8: symmetric per-row codes; MatMuls become MatMulInteger with dynamic activation
  quantization, experts become com.microsoft QMoE 8-bit.
- int4: symmetric block-wise codes; MatMuls become com.microsoft MatMulNBits, the embedding
  GatherBlockQuantized, experts QMoE 4-bit.

Routers stay fp32: the model fingerprint includes the router weights, so every export keeps
the parent's fingerprint, and a quantized router could change which experts run.
"""
from __future__ import annotations

import numpy as np

from converters.onnx.errors import OnnxExportError
from converters.onnx.options import QUANT_TYPES


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
