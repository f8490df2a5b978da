"""MXFP4 (OCP microscaling FP4) expert weights as GPT-OSS checkpoints store them:
`*_blocks` uint8 [..., rows, groups, 16] (two 4-bit codes per byte, low nibble first) and
`*_scales` uint8 [..., rows, groups] (power-of-two exponent + 127), 32 values per group.
Dequantised exactly to float32 (every FP4 value times a power of two is a float32)."""
from __future__ import annotations

import numpy as np

# E2M1 code -> value; bit 3 is the sign
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      dtype=np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., rows, groups, 16] codes + [..., rows, groups] exponents -> float32 [..., rows, groups * 32]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
    pairs = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)  # low nibble = even element
    values = pairs.reshape(*scales.shape, 32)
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * 32)
