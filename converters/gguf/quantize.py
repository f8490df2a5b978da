"""Quantization through llama.cpp's own quantizer (llama_model_quantize, as exposed by
llama-cpp-python), so the files are exactly what llama.cpp's `llama-quantize` would write.

llama.cpp decides per tensor: routers (ffn_gate_inp), norms and other 1-D tensors stay F32,
and a tensor whose rows are not a multiple of the k-quant block (256) falls back to a legacy
type (q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0, ...). What was actually used is read back
from the written file and recorded in its export config (`quantization.tensor_types`,
`quantization.fallbacks`).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

from converters.gguf.errors import QuantizeError
from packager.core.errors import OutputExistsError

logger = logging.getLogger(__name__)

# user-facing name -> llama.cpp ftype constant name (LLAMA_FTYPE_MOSTLY_*)
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1",
               "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS", "MXFP4_MOE", "F16", "BF16")
K_QUANT_BLOCK = 256


def parse_quant_types(quant: list[str] | str | None) -> list[str]:
    if quant is None:
        return []
    items = quant.split(",") if isinstance(quant, str) else list(quant)
    out = []
    for item in items:
        name = item.strip().upper()
        if not name:
            continue
        if name not in QUANT_TYPES:
            raise QuantizeError(f"unknown quantization type {item.strip()!r}; choose from {', '.join(QUANT_TYPES)}")
        if name not in out:
            out.append(name)
    return out


def block_size(quant_type: str) -> int:
    """Row-length multiple the main type of `quant_type` needs (1 for float types)."""
    if quant_type in ("F16", "BF16"):
        return 1
    if "_K" in quant_type or quant_type == "IQ4_XS":
        return K_QUANT_BLOCK
    return 32


def tensor_type_report(gguf_path: Path, quant_type: str) -> dict:
    """Types llama.cpp actually wrote, and which tensors fell back from the k-quant block."""
    from converters.gguf.gguf_file import open_gguf

    reader = open_gguf(gguf_path)
    counts: Counter[str] = Counter()
    fallbacks: dict[str, str] = {}
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        counts[type_name] += 1
        row = int(tensor.shape[0])
        # llama.cpp falls back (down to F16) when rows do not split into the type's blocks;
        # F32 tensors (routers, norms) are never quantized at all
        if len(tensor.shape) > 1 and row % block_size(quant_type) and type_name != "F32":
            fallbacks[tensor.name] = type_name
    return {"tensor_types": dict(sorted(counts.items())), "fallbacks": fallbacks}


def quantize_gguf(in_file: str | os.PathLike, out_file: str | os.PathLike, quant_type: str, *, force: bool = False,
                  n_threads: int | None = None) -> Path:
    """llama.cpp-quantize `in_file` to `out_file` (atomic) and write its export config."""
    import llama_cpp

    from converters.gguf.export_config import write_export_config
    from converters.gguf.gguf_file import open_gguf
    from runtime.atomic import atomic_output

    in_file, out_file = Path(in_file), Path(out_file)
    (quant_type,) = parse_quant_types(quant_type)
    if out_file.exists() and not force:
        raise OutputExistsError(f"{out_file}: output file exists; choose another path or pass --force")
    open_gguf(in_file)  # clear error before llama.cpp sees a bad file
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant_type}")
    params.nthread = n_threads or max(1, os.cpu_count() or 1)
    params.allow_requantize = False
    started = time.monotonic()
    from runtime.backends.llama_cpp_backend import llama_module

    llama_module()  # routes llama.cpp's log to logging (debug)
    with atomic_output(out_file) as tmp:
        rc = llama_cpp.llama_model_quantize(str(in_file).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            if out_file.parent.is_dir() and _free_bytes(out_file.parent) < in_file.stat().st_size // 4:
                raise QuantizeError(f"{out_file}: llama.cpp's quantizer failed for {quant_type} (code {rc}) with "
                                    f"{_free_bytes(out_file.parent):,} bytes free beside it; free space or write elsewhere")
            raise QuantizeError(
                f"{in_file}: llama.cpp's quantizer failed for {quant_type} (code {rc}); an already quantized input "
                f"cannot be re-quantized: quantize from the F32/F16 export"
            )
    seconds = time.monotonic() - started
    report = tensor_type_report(out_file, quant_type)
    logger.info("gguf: %s -> %s %s in %.1fs (%d fallback tensors)", in_file.name, out_file.name, quant_type, seconds,
                len(report["fallbacks"]))
    write_export_config(out_file, {"type": quant_type, "source_file": in_file.name, "quantizer": "llama.cpp llama_model_quantize",
                                   "seconds": round(seconds, 3), **report})
    return out_file


def _free_bytes(directory: Path) -> int:
    import shutil

    return shutil.disk_usage(directory).free
