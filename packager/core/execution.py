"""How calibration runs a transformers parent: whole in memory or streamed layer by layer
(packager.core.layer_stream), and where. The one place that knows about devices, free memory and
the size of the weights at a compute dtype."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from packager.core.errors import PackagerError

logger = logging.getLogger(__name__)

TORCH_DTYPES = ("float32", "bfloat16", "float16")
# whole-model calibration measured at 1.8x the weights (transformers' loading copies); keep a margin
WHOLE_MODEL_FACTOR = 2.0
RAM_RESERVE_BYTES = 1024**3


class StreamingError(PackagerError):
    """Streamed execution cannot proceed (spill space, device, missing layer tensors)."""


def torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise StreamingError(f"--dtype {name!r}: use one of {', '.join(TORCH_DTYPES)}")
    return table[name]


def torch_dtype_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


# ---- device and the whole-vs-streamed choice (the one place that knows about devices) -----------
def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'. 'cuda' without a GPU is an error."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StreamingError(f"--device {name}: torch sees no CUDA device here; use --device cpu (or auto)")
        return name
    raise StreamingError(f"--device {name!r}: use cpu, cuda, cuda:N or auto")


def available_memory(device: str) -> int:
    """Bytes the run may use on `device`: free device memory for CUDA, available RAM for the CPU."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def weight_bytes(reader, arch, config: dict, dtype: str) -> dict:
    """Bytes of the weights once converted to `dtype`: total, largest decoder layer, the rest.
    MXFP4 blocks count two values per byte, their scales none (they are folded into values)."""
    import torch

    element = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    packed: dict[str, float] = {}
    for layer_idx in arch.moe_layers(config):
        for role, name in arch.fused_expert_names(layer_idx).items():
            if role in arch.packed_params_per_element:
                packed[name] = arch.packed_params_per_element[role]
    from packager.core.quant_formats import logical_shape, logical_tensors

    prefix = layer_prefix_template(reader.config)
    per_layer: dict[int, int] = {}
    other = 0
    for name in logical_tensors(reader):  # a quantized linear counts its dequantised values
        nbytes = int(numel(logical_shape(reader, name)) * packed.get(name, 1.0) * element)
        layer_idx = _layer_of(name, prefix)
        if layer_idx is None:
            other += nbytes
        else:
            per_layer[layer_idx] = per_layer.get(layer_idx, 0) + nbytes
    largest = max(per_layer.values(), default=0)
    return {"total": other + sum(per_layer.values()), "largest_layer": largest, "other": other}


def layer_prefix_template(config: dict) -> str:
    """The checkpoint prefix of decoder layers (all supported families: model.layers.N.)."""
    return "model.layers."


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class Execution:
    """How a model is run: whole in memory or streamed layer by layer, and where."""

    mode: str               # "whole" | "streamed"
    device: str
    reason: str
    weight_bytes: int        # at the compute dtype
    largest_layer_bytes: int
    available_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def choose_execution(model_dir: Path, dtype: str, device: str = "auto", forced: str = "auto") -> Execution:
    """Whole-model execution when the model fits the device with room to spare, else streamed.
    `forced` ('whole' / 'streamed') overrides the choice; the reason says which happened."""
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader

    if forced not in ("auto", "whole", "streamed"):
        raise StreamingError(f"--execution {forced!r}: use auto, whole or streamed")
    device = resolve_device(device)
    with CheckpointReader(model_dir) as reader:
        config = dict(reader.config)
        arch = load_arch(config)
        sizes = weight_bytes(reader, arch, config, dtype)
        quant = reader.quant
    available = available_memory(device)
    need = int(sizes["total"] * WHOLE_MODEL_FACTOR) + RAM_RESERVE_BYTES
    gib = 1024**3
    if quant.dequantized_here:
        # transformers' loaders for these formats need accelerate and GPU kernels; the streamed
        # path dequantises each linear itself (packager.core.quant_formats)
        if forced == "whole":
            raise StreamingError(f"--execution whole: {model_dir} is a {quant.label} checkpoint, which runs streamed "
                                 "(dequantised layer by layer by the packager); use --execution auto or streamed")
        mode, reason = "streamed", f"{quant.label} parent: streamed, dequantised on the fly"
    elif forced != "auto":
        mode, reason = forced, f"--execution {forced}"
    elif need <= available:
        mode = "whole"
        reason = f"weights {sizes['total'] / gib:.2f} GiB at {dtype} fit {device} ({available / gib:.1f} GiB available)"
    else:
        mode = "streamed"
        reason = (f"weights {sizes['total'] / gib:.2f} GiB at {dtype} need about {need / gib:.1f} GiB whole, "
                  f"{device} has {available / gib:.1f} GiB available: streaming one layer "
                  f"({sizes['largest_layer'] / gib:.2f} GiB) at a time")
    logger.info("execution: %s on %s (%s)", mode, device, reason)
    return Execution(mode, device, reason, sizes["total"], sizes["largest_layer"], available)
