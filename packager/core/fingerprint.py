"""Model identity and file hashes.

The model fingerprint identifies a parent independently of its file format: it hashes what
routing depends on, not file bytes, so the same model as safetensors, GGUF or quantized GGUF
(routers stay F32 there) gets the same fingerprint. Canonical form, version 1:

    sha256( b"edge-packager-fingerprint-v1\\n"
            + json({"family", "moe_layers", "n_experts" (one count per MoE layer), "top_k"
                    (a number; one per MoE layer only when a per-layer top-k differs between layers)},
                   keys sorted, separators (",", ":"))
            + b"\\n"
            + for each MoE layer in ascending order: router weight [n_experts, hidden]
              as little-endian float32, row-major )

Use `fingerprint_from_parts` to compute it from another format."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np

from packager.core.errors import CheckpointError
from runtime.file_hash import file_sha256  # noqa: F401 - re-exported: the build side's callers import it here

FINGERPRINT_PREFIX = b"edge-packager-fingerprint-v1\n"

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def bytes_to_float32(raw: bytes, dtype: str, shape: Iterable[int]) -> np.ndarray:
    """Exact float32 view of F32/F16/BF16/F64 tensor bytes (bf16 widened bit-wise)."""
    shape = tuple(shape)
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view("<f4").reshape(shape)
    if dtype in ("F32", "F16", "F64"):
        return np.frombuffer(raw, dtype=np.dtype(_NUMPY_DTYPES[dtype]).newbyteorder("<")).astype("<f4").reshape(shape)
    raise CheckpointError(f"router tensors must be floating point (F32/F16/BF16/F64), got {dtype}")


def tensor_to_bytes(tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(safetensors dtype, shape, little-endian bytes) of a torch tensor or numpy array."""
    if isinstance(tensor, np.ndarray):
        for name, np_dtype in _NUMPY_DTYPES.items():
            if tensor.dtype == np_dtype:
                array = np.ascontiguousarray(tensor, dtype=np.dtype(np_dtype).newbyteorder("<"))
                return name, tuple(array.shape), array.tobytes()
        raise ValueError(f"unsupported numpy dtype {tensor.dtype}")
    import torch

    torch_names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }
    dtype = torch_names.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"unsupported torch dtype {tensor.dtype}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return dtype, tuple(tensor.shape), raw


def fingerprint_from_parts(family: str, moe_layers: list[int], n_experts: list[int], top_k: int | list[int],
                           router_weights: Iterable[np.ndarray]) -> str:
    """The fingerprint from its parts (router weights in `moe_layers` order, any float dtype)."""
    if len(n_experts) != len(moe_layers):
        raise ValueError("n_experts needs one count per MoE layer")
    if isinstance(top_k, list) and len(top_k) != len(moe_layers):
        raise ValueError("a per-layer top_k needs one k per MoE layer")
    top_k = [int(k) for k in top_k] if isinstance(top_k, list) else int(top_k)
    head = {"family": family, "moe_layers": list(moe_layers), "n_experts": list(n_experts), "top_k": top_k}
    digest = hashlib.sha256(FINGERPRINT_PREFIX)
    digest.update(json.dumps(head, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    digest.update(b"\n")
    seen = 0
    for weight, n in zip(router_weights, n_experts, strict=True):
        weight = np.ascontiguousarray(weight, dtype="<f4")
        if weight.ndim != 2 or weight.shape[0] != n:
            raise ValueError(f"router weight shape {weight.shape} does not match {n} experts")
        digest.update(weight.tobytes())
        seen += 1
    if seen != len(moe_layers):
        raise ValueError("one router weight per MoE layer is needed")
    return digest.hexdigest()


def model_fingerprint(model_dir) -> str:
    """Fingerprint of a safetensors checkpoint directory (or an open CheckpointReader)."""
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader

    reader = model_dir if isinstance(model_dir, CheckpointReader) else CheckpointReader(model_dir)
    try:
        arch = load_arch(reader.config)
        layers = arch.moe_layers(reader.config)
        counts = [arch.n_experts(reader.config, layer_idx) for layer_idx in layers]

        def routers():
            for layer_idx in layers:
                info = reader.info(arch.router_weight_name(layer_idx))
                yield bytes_to_float32(reader.read_bytes(info.name), info.dtype, info.shape)

        try:
            return fingerprint_from_parts(arch.family, layers, counts, arch.fingerprint_top_k(reader.config), routers())
        except ValueError as exc:
            raise CheckpointError(f"{reader.model_dir}: router weights do not match config.json ({exc})") from None
    finally:
        if reader is not model_dir:
            reader.close()
