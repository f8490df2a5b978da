"""Layer-streamed execution of a safetensors parent: run a model that does not fit in memory.

The model is built as a skeleton whose parameters live on the meta device (no memory), with
its real buffers (rotary frequencies). Execution then goes layer by layer over all sequences:

1. the embedding (and final norm) are read from the checkpoint; a pass through the decoder
   with every layer replaced by a recorder gives each batch's embedded hidden states and the
   exact arguments the model hands its layers (masks, positions, rotary tables, per layer, so
   sliding-window layers get theirs);
2. for each decoder layer: its tensors are read from the shards into ordinary memory (pread,
   no memory map, so resident memory is one layer), converted to the in-memory layout
   transformers uses (per-expert keys stacked, MXFP4 dequantised, renamed routers), the
   layer runs over every batch, and its tensors go back to the meta device. While a layer
   computes, the kernel is already reading the next layer's byte ranges (posix_fadvise
   WILLNEED), so the disk works while the CPU does;
3. hidden states stay in memory while they fit a budget and otherwise live in a spill file.

The LM head is never loaded: teacher-forced routing capture needs only the decoder.
Forward hooks on the skeleton's modules (packager.calibrate.RoutingRecorder) see the
materialised layers exactly as in a whole model: the modules are the same objects.

Which tensors a layer needs comes from the skeleton's own state dict (parameters and
persistent buffers); where each one lives on disk comes from packager.arch (router names,
expert layouts). A tensor found nowhere is an error naming it, before any layer runs."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from packager.errors import CheckpointError, PackagerError

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


def _safetensors_torch_dtype(code: str):
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    if code not in table:
        raise CheckpointError(f"safetensors dtype {code!r} cannot be read for streamed execution")
    return table[code]


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
    from packager.quant_formats import logical_shape, logical_tensors

    prefix = layer_prefix_template(reader.config)
    per_layer: dict[int, int] = {}
    other = 0
    for name in logical_tensors(reader):  # a quantized linear counts its dequantised values
        nbytes = int(_numel(logical_shape(reader, name)) * packed.get(name, 1.0) * element)
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
    from packager.arch import load_arch
    from packager.checkpoint import CheckpointReader

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
        # path dequantises each linear itself (packager.quant_formats)
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


# ---- the skeleton -------------------------------------------------------------------------------------
class _ParametersOnMeta:
    """Context in which nn.Module parameters are created on the meta device while buffers
    (rotary inverse frequencies and the like, computed in __init__) stay real."""

    def __enter__(self):
        import torch

        self._original = torch.nn.Module.register_parameter

        def register_parameter(module, name, param):
            self._original(module, name, param)
            if param is not None and param.device.type != "meta":
                kind = type(module._parameters[name])
                module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=False)

        torch.nn.Module.register_parameter = register_parameter
        return self

    def __exit__(self, *exc):
        import torch

        torch.nn.Module.register_parameter = self._original
        return False


def build_skeleton(model_dir: Path, dtype: str):
    """The transformers model of `model_dir` with every parameter on the meta device."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        config.quantization_config = None  # quantized weights (MXFP4, FP8, GPTQ, ...) are dequantised by the streamed loader
        if hasattr(config, "_pre_quantization_dtype"):
            del config._pre_quantization_dtype
    with _ParametersOnMeta(), torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), trust_remote_code=False)
    model.eval()
    model.requires_grad_(False)
    return model


def decoder_layers(model):
    """The decoder layer list of a causal LM (every supported family: base_model.layers)."""
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise StreamingError(f"{type(model).__name__}: no decoder layer list (base_model.layers) to stream")
    return layers


# ---- where each in-memory tensor lives on disk -----------------------------------------------------
@dataclass(frozen=True)
class TensorSource:
    """How to build one in-memory tensor: a direct read, stacked per-expert reads, or MXFP4."""

    kind: str                      # "direct" | "stack" | "mxfp4" | "dequant"
    names: tuple[tuple[str, ...], ...]  # direct: ((name,),); stack: per expert (part, ...); mxfp4: ((blocks, scales),)
    # dequant: like direct or stack (per expert (part, ...)), but the names are logical weights of
    # quantized linears (packager.quant_formats), dequantised on read; `physical` lists their files' tensors
    physical: tuple[str, ...] = ()

    def disk_names(self) -> list[str]:
        return list(self.physical) or [name for group in self.names for name in group]


def layer_sources(arch, config: dict, layer_idx: int, targets: Sequence[str], present,
                  quantized: dict | None = None) -> dict[str, TensorSource]:
    """Disk sources of the in-memory tensors `targets` (full names) of decoder layer `layer_idx`.
    `present` holds the checkpoint's logical tensor names; `quantized` maps the logical weight of
    each quantized linear to its on-disk parts (packager.quant_formats.logical_tensors).

    Raises CheckpointError naming every tensor that has no source."""
    sources: dict[str, TensorSource] = {}
    renamed: dict[str, str] = {}
    quantized = quantized or {}
    if layer_idx in arch.moe_layers(config):
        arch.layer_expert_tensors(layer_idx, arch.n_experts(config, layer_idx), present)  # refuses unknown expert tensors
        router = arch.router_module(layer_idx)
        for disk_name in arch.router_tensor_names(layer_idx):
            renamed[f"{router}.{disk_name.rsplit('.', 1)[1]}"] = disk_name
        experts = arch.experts_module(layer_idx)
        n_experts = arch.n_experts(config, layer_idx)
        layout = arch.detect_layout(layer_idx, n_experts, present)
        fused = arch.fused_expert_names(layer_idx)
        if layout == "per_expert":
            per_expert = [arch.expert_tensor_names(layer_idx, e) for e in range(n_experts)]
            for target, roles in ((f"{experts}.gate_up_proj", ("gate", "up")), (f"{experts}.down_proj", ("down",))):
                names = tuple(tuple(n[role] for role in roles) for n in per_expert)
                parts = tuple(p for group in names for name in group for p in quantized.get(name, ()))
                sources[target] = TensorSource("dequant" if parts else "stack", names, parts)
        elif layout == "mxfp4":
            for proj in ("gate_up", "down"):
                sources[fused[proj]] = TensorSource("mxfp4", ((fused[f"{proj}_blocks"], fused[f"{proj}_scales"]),))
    missing = []
    for target in targets:
        if target in sources:
            continue
        disk_name = target if target in present else renamed.get(target)
        if disk_name is None or disk_name not in present:
            missing.append(target)
            continue
        if disk_name in quantized:
            sources[target] = TensorSource("dequant", ((disk_name,),), tuple(quantized[disk_name]))
        else:
            sources[target] = TensorSource("direct", ((disk_name,),))
    if missing:
        shown = ", ".join(repr(n) for n in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(f"layer {layer_idx}: tensor(s) {shown} missing from the checkpoint's shards")
    return {t: sources[t] for t in targets}


# ---- reading tensors without a memory map -----------------------------------------------------------
class ShardFiles:
    """Open shard files; reads tensors with pread into ordinary memory and asks the kernel to
    read ahead byte ranges that will be needed next."""

    def __init__(self, reader):
        self.reader = reader
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, name: str, rows: tuple[int, int] | None = None, out=None):
        """One tensor (or rows [start, stop) along dim 0), in its stored dtype, in anonymous memory.
        With `out` (contiguous, same dtype and size) the bytes land there without a copy."""
        import numpy as np
        import torch

        info = self.reader.info(name)
        dtype = _safetensors_torch_dtype(info.dtype)
        shape, offset, nbytes = list(info.shape), info.offset, info.nbytes
        if rows is not None:
            start, stop = rows
            row_bytes = info.nbytes // info.shape[0]
            shape[0], offset, nbytes = stop - start, info.offset + start * row_bytes, (stop - start) * row_bytes
        if out is not None and out.dtype == dtype and out.is_contiguous() and out.numel() * out.element_size() == nbytes:
            view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
            result = out
        else:
            buffer = np.empty(nbytes, dtype=np.uint8)
            view = memoryview(buffer)
            result = torch.from_numpy(buffer).view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
        fd, done = self._fd(info.path), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{info.path}: unexpected end of file reading {name!r}; re-copy the checkpoint")
            done += n
        self.bytes_read += nbytes
        if result is out and out is not None:
            return out
        if out is not None:
            out.copy_(result.reshape(out.shape))
            return out
        return result

    def prefetch(self, names: Sequence[str]) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        for name in names:
            info = self.reader.info(name)
            try:
                os.posix_fadvise(self._fd(info.path), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                return

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def build_tensor(files: ShardFiles, source: TensorSource, like, dtype, rows: tuple[int, int] | None = None):
    """The in-memory tensor `like` (a meta tensor: shape and kind) built from its disk source;
    with `rows`, only experts [start, stop) of an expert tensor (dim 0)."""
    import torch

    shape = list(like.shape)
    if rows is not None:
        shape[0] = rows[1] - rows[0]
    if source.kind == "direct":
        if not like.is_floating_point() or files.reader.info(source.names[0][0]).dtype == _DTYPE_CODES.get(dtype):
            out = files.read(source.names[0][0], rows)
        else:
            out = files.read(source.names[0][0], rows).to(dtype)
    elif source.kind == "stack":
        out = torch.empty(shape, dtype=dtype)
        experts = source.names if rows is None else source.names[rows[0]:rows[1]]
        for slot, parts in enumerate(experts):
            row = 0
            for name in parts:
                n_rows = files.reader.info(name).shape[0]
                files.read(name, out=out[slot, row:row + n_rows])  # straight into the stacked tensor
                row += n_rows
            if row != shape[1]:
                raise CheckpointError(f"{parts[0]!r}: expert rows {row} do not match the model's {shape[1]}")
    elif source.kind == "dequant":
        out = _dequantized(files, source, shape, dtype, rows)
    elif source.kind == "mxfp4":
        from packager.mxfp4 import dequantize_mxfp4

        blocks_name, scales_name = source.names[0]
        blocks, scales = files.read(blocks_name, rows), files.read(scales_name, rows)
        out = torch.empty(shape, dtype=dtype)
        for slot in range(blocks.shape[0]):  # one expert at a time bounds the float32 copy
            values = dequantize_mxfp4(blocks[slot].numpy(), scales[slot].numpy())
            out[slot].copy_(torch.from_numpy(values).transpose(0, 1))
    else:
        raise ValueError(f"unknown tensor source kind {source.kind!r}")
    if list(out.shape) != shape:
        raise CheckpointError(
            f"{source.disk_names()[0]!r}: shape {list(out.shape)} does not match the model's {shape} "
            "(config.json and weights disagree)"
        )
    return out


def _dequantized(files: ShardFiles, source: TensorSource, shape: list[int], dtype, rows):
    """A tensor whose parts are quantized linears, dequantised one linear at a time (float32
    exact, then the compute dtype): a single weight, or experts stacked like "stack"."""
    import torch

    from packager.quant_formats import logical_tensors

    linears = logical_tensors(files.reader)

    def read(name):
        return files.read(name).reshape(-1).view(torch.uint8).numpy()

    def value(name):
        linear = linears.get(name)
        if linear is None:
            return files.read(name).to(dtype)
        return torch.from_numpy(linear.dequantize(read)).to(dtype)

    if len(source.names) == 1 and len(source.names[0]) == 1 and rows is None and len(shape) == 2:
        return value(source.names[0][0])
    out = torch.empty(shape, dtype=dtype)
    experts = source.names if rows is None else source.names[rows[0]:rows[1]]
    for slot, parts in enumerate(experts):
        row = 0
        for name in parts:
            part = value(name)
            out[slot, row:row + part.shape[0]] = part
            row += part.shape[0]
        if row != shape[1]:
            raise CheckpointError(f"{parts[0]!r}: expert rows {row} do not match the model's {shape[1]}")
    return out


_DTYPE_CODES: dict = {}


def _init_dtype_codes() -> None:
    import torch

    _DTYPE_CODES.update({torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"})


def _set_tensor(module, path: str, value) -> None:
    """Replace parameter or buffer `path` (relative to module) by `value`."""
    import torch

    owner_name, _, attr = path.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(path)


def _to_meta(module) -> None:
    """Free a materialised module: every parameter and buffer back to the meta device."""
    import torch

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = torch.nn.Parameter(param.detach().to("meta"), requires_grad=False)
        persistent = set(sub._buffers) - set(getattr(sub, "_non_persistent_buffers_set", set()))
        for name in persistent:
            buf = sub._buffers[name]
            if buf is not None and buf.device.type != "meta":
                sub._buffers[name] = buf.to("meta")


# ---- hidden states: memory or spill file ------------------------------------------------------------
class HiddenStore:
    """Hidden states of every batch between layers: in memory, or in one spill file (pread /
    pwrite per batch, so resident memory stays one batch)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype, budget_bytes: int | None, spill_dir: Path | None):
        import torch

        self.shapes = list(shapes)
        self.dtype = dtype
        element = torch.empty((), dtype=dtype).element_size()
        self.sizes = [element * _numel(shape) for shape in self.shapes]
        self.total_bytes = sum(self.sizes)
        self.spilled = budget_bytes is not None and self.total_bytes > budget_bytes
        self._memory: list = [None] * len(self.shapes)
        self._dir: Path | None = None
        self._fd: int | None = None
        if self.spilled:
            spill_dir = Path(spill_dir or tempfile.gettempdir())
            if not spill_dir.is_dir():
                raise StreamingError(f"{spill_dir}: spill directory does not exist: create it or pass another --spill-dir")
            free = shutil.disk_usage(spill_dir).free
            need = self.total_bytes + 64 * 1024**2
            if free < need:
                raise StreamingError(
                    f"{spill_dir}: not enough disk for the hidden-state spill: needs {need} bytes, {free} free; "
                    "free space, pass --spill-dir on a larger disk, or raise --max-activation-mb"
                )
            self._dir = Path(tempfile.mkdtemp(prefix=".calibration-spill-", dir=spill_dir))
            path = self._dir / "hidden.bin"
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, self.total_bytes)
            self._offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
            logger.info("hidden states: %.1f MB spill file in %s", self.total_bytes / 1e6, self._dir)

    def put(self, index: int, tensor) -> None:
        tensor = tensor.detach().to("cpu", self.dtype).contiguous()
        if not self.spilled:
            self._memory[index] = tensor
            return
        raw = tensor.reshape(-1).view(_integer_view(self.dtype)).numpy().tobytes()
        written, offset = 0, self._offsets[index]
        view = memoryview(raw)
        while written < len(raw):
            written += os.pwrite(self._fd, view[written:], offset + written)

    def get(self, index: int):
        import numpy as np
        import torch

        if not self.spilled:
            return self._memory[index]
        buffer = np.empty(self.sizes[index], dtype=np.uint8)
        view, done, offset = memoryview(buffer), 0, self._offsets[index]
        while done < self.sizes[index]:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise StreamingError(f"{self._dir}: spill file ended early")
            done += n
        return torch.from_numpy(buffer).view(self.dtype).reshape(self.shapes[index])

    def close(self) -> None:
        self._memory = [None] * len(self.shapes)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _integer_view(dtype):
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]


# ---- the layer-input recorder ---------------------------------------------------------------------
class _LayerInputs:
    """Stands in for a decoder layer during the embedding pass: records the arguments the
    model passes to it and returns the hidden states unchanged."""

    def __init__(self, layer, calls: list):
        import torch

        class Recorder(torch.nn.Module):
            def __init__(inner):
                super().__init__()
                object.__setattr__(inner, "_layer", layer)

            def __getattr__(inner, name):  # attributes the model's forward reads (attention_type)
                try:
                    return torch.nn.Module.__getattr__(inner, name)
                except AttributeError:
                    return getattr(object.__getattribute__(inner, "_layer"), name)

            def forward(inner, hidden_states, *args, **kwargs):
                calls.append((hidden_states, args, kwargs))
                return hidden_states

        self.module = Recorder()


@dataclass
class StreamReport:
    layers: int = 0
    batches: int = 0
    tokens: int = 0
    expert_groups: int = 0        # expert groups of the largest MoE layer
    experts_per_group: int = 0
    bytes_read: int = 0
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    hidden_bytes: int = 0
    spilled: bool = False

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# grouped_mm on the CPU copies each transposed weight it multiplies: a group costs about 1.7x its bytes
DEFAULT_EXPERT_GROUP_BYTES = 128 * 1024**2
EXPERT_ROW_CHUNK = 4096  # (token, expert) rows per experts call in a streamed run


def bound_kernel_caches() -> None:
    """Keep the CPU matmul libraries from caching per-shape kernels and reordered weights.
    A streamed run multiplies ever new weight tensors (one expert group after another) with
    ever new row counts, so PyTorch's mkldnn LRU cache and oneDNN's primitive cache would grow
    with every layer (about 45 MB per layer measured at Qwen3-30B shapes) and never be hit.
    Both read their capacity from the environment at first use; a caller's own setting wins."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", "1")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")


class StreamedModel:
    """A causal LM whose decoder runs one layer at a time from the checkpoint on disk.

    Each decoder layer runs in two passes over all batches, so that only part of it is ever in
    memory: (A) its attention, norms, router and shared experts run with the routed experts
    answering zero while their inputs (hidden states, chosen experts, gate weights) are kept;
    (B) the routed experts are read in groups of `expert_group_bytes` and each group computes
    the rows routed to it, added to the layer output. This equals the whole layer because every
    supported family adds the routed experts' weighted sum linearly to the rest of the layer
    (tests compare against the whole model for each family)."""

    def __init__(self, model_dir: str | os.PathLike, dtype: str = "float32", device: str = "cpu",
                 expert_group_bytes: int | None = None):
        from packager.arch import load_arch
        from packager.checkpoint import CheckpointReader

        _init_dtype_codes()
        bound_kernel_caches()
        self.model_dir = Path(model_dir)
        self.dtype_name = dtype
        self.dtype = torch_dtype(dtype)
        self.device = device
        self.expert_group_bytes = expert_group_bytes or DEFAULT_EXPERT_GROUP_BYTES
        self.reader = CheckpointReader(self.model_dir)
        self.config = dict(self.reader.config)
        self.arch = load_arch(self.config)
        self.model = build_skeleton(self.model_dir, dtype)
        if device != "cpu":  # the real buffers (rotary tables) live where the layers run
            for name, buf in list(self.model.named_buffers()):
                if buf.device.type != "meta":
                    _set_tensor(self.model, name, buf.to(device))
        self.layers = decoder_layers(self.model)
        self.files = ShardFiles(self.reader)
        from packager.quant_formats import logical_tensors

        logical = logical_tensors(self.reader)  # quantized linears under their logical weight names
        present = set(logical)
        quantized = {name: tuple(linear.parts.values()) for name, linear in logical.items() if linear is not None}
        layer_prefix = _module_path(self.model, self.layers)
        self._layer_paths = [f"{layer_prefix}.{i}" for i in range(len(self.layers))]
        moe_layers = set(self.arch.moe_layers(self.config))
        meta = dict(self.model.named_parameters())
        meta.update(dict(self.model.named_buffers()))
        # resolve every layer's sources up front: a missing tensor fails before any work
        self._sources: list[dict[str, TensorSource]] = []      # the layer minus its routed experts
        self._expert_sources: list[dict[str, TensorSource]] = []
        self._expert_meta: list[dict] = []
        self._groups: list[list[tuple[int, int]]] = []
        for layer_idx, (path, layer) in enumerate(zip(self._layer_paths, self.layers)):
            targets = [f"{path}.{name}" for name in layer.state_dict(keep_vars=True)]
            sources = layer_sources(self.arch, self.config, layer_idx, targets, present, quantized)
            experts_prefix = self.arch.experts_module(layer_idx) + "." if layer_idx in moe_layers else None
            experts = {t: s for t, s in sources.items() if experts_prefix and t.startswith(experts_prefix)}
            self._sources.append({t: s for t, s in sources.items() if t not in experts})
            self._expert_sources.append(experts)
            self._expert_meta.append({t: meta[t] for t in experts})
            self._groups.append(self._expert_groups(layer_idx, experts, meta) if experts else [])
        decoder = self.model.base_model
        decoder_path = _module_path(self.model, decoder)
        embedding = decoder.get_input_embeddings()
        # a plain embedding table is read row by row for the tokens in use, not whole
        self._embedding_name = None
        if type(embedding) is torch_nn().Embedding:
            self._embedding_name = f"{_module_path(self.model, embedding)}.weight"
        self._outer: dict[str, TensorSource] = {}
        missing = []
        for name in decoder.state_dict(keep_vars=True):
            full = f"{decoder_path}.{name}" if decoder_path else name
            if full.startswith(f"{layer_prefix}."):
                continue
            if full not in present:
                missing.append(full)
            elif full != self._embedding_name:
                self._outer[full] = TensorSource("direct", ((full,),))
        if missing:
            raise CheckpointError(f"{self.model_dir}: tensor(s) {', '.join(map(repr, missing[:4]))} missing from the checkpoint's shards")

    def _embedding_rows(self, batches: Sequence[tuple]):
        """(sorted token ids in use, their embedding rows at the compute dtype), read from the
        checkpoint row by row; None when the model's embedding is not a plain table."""
        import torch

        if self._embedding_name is None:
            return None
        rows = torch.unique(torch.cat([ids.reshape(-1) for ids, _ in batches]))
        info = self.reader.info(self._embedding_name)
        if int(rows.max()) >= info.shape[0]:
            raise StreamingError(f"token id {int(rows.max())} is outside the embedding table of {info.shape[0]} rows")
        vectors = torch.empty((len(rows), info.shape[1]), dtype=self.dtype)
        for slot, row in enumerate(rows.tolist()):
            self.files.read(self._embedding_name, (row, row + 1), out=vectors[slot:slot + 1])
        return rows, vectors

    def _expert_groups(self, layer_idx: int, experts: dict, meta: dict) -> list[tuple[int, int]]:
        n_experts = self.arch.n_experts(self.config, layer_idx)
        element = torch_dtype_size(self.dtype)
        per_expert = sum(_numel(meta[t].shape) // n_experts for t in experts) * element
        size = max(1, min(n_experts, self.expert_group_bytes // max(1, per_expert)))
        return [(start, min(start + size, n_experts)) for start in range(0, n_experts, size)]

    def _tensor_bytes(self, sources: dict, rows: tuple[int, int] | None = None) -> int:
        meta = dict(self.model.named_parameters())
        meta.update(dict(self.model.named_buffers()))
        total = 0
        for target in sources:
            numel = _numel(meta[target].shape)
            if rows is not None:
                numel = numel // meta[target].shape[0] * (rows[1] - rows[0])
            total += numel * torch_dtype_size(self.dtype)
        return total

    def resident_weight_bytes(self) -> int:
        """The most weight bytes a streamed run holds at once (a layer without its experts, or
        one expert group), at the compute dtype."""
        most = self._tensor_bytes(self._outer)
        for layer_idx in range(len(self.layers)):
            most = max(most, self._tensor_bytes(self._sources[layer_idx]))
            for rows in self._groups[layer_idx]:
                most = max(most, self._tensor_bytes(self._expert_sources[layer_idx], rows))
        return most

    # -- materialising ------------------------------------------------------------------------
    def _load(self, sources: dict[str, TensorSource], rows: tuple[int, int] | None = None) -> None:
        import torch

        meta = dict(self.model.named_parameters())
        meta.update(dict(self.model.named_buffers()))
        for target, source in sources.items():
            like = meta[target]
            value = build_tensor(self.files, source, like, self.dtype if like.is_floating_point() else like.dtype, rows)
            if self.device != "cpu":
                value = value.to(self.device, non_blocking=True)
            _set_tensor(self.model, target, value)
        if self.device != "cpu":
            torch.cuda.synchronize(self.device)

    def load_layer(self, layer_idx: int) -> None:
        """Materialise a whole decoder layer (all experts at once): for tests and small models."""
        self._load(self._sources[layer_idx])
        if self._expert_sources[layer_idx]:
            self._load(self._expert_sources[layer_idx])

    def _prefetch(self, layer_idx: int) -> threading.Thread | None:
        if layer_idx >= len(self.layers):
            return None
        names = [n for sources in (self._sources[layer_idx], self._expert_sources[layer_idx])
                 for source in sources.values() for n in source.disk_names()]
        thread = threading.Thread(target=self.files.prefetch, args=(names,), daemon=True)
        thread.start()
        return thread

    # -- running --------------------------------------------------------------------------------
    def run(self, batches: Sequence[tuple], before_layer: Callable[[int, int], None] | None = None,
            expert_rows: Callable | None = None, hidden_budget_bytes: int | None = None,
            spill_dir: Path | None = None, progress: Callable[[int, int], None] | None = None) -> StreamReport:
        """Run the decoder over `batches` of (input_ids [B, S], attention_mask [B, S]).

        `before_layer(layer_idx, batch_idx)` is called before each layer runs on a batch (the
        router hooks' bookkeeping); `expert_rows(layer_idx, batch_idx, token_idx, expert_idx,
        gate_weights, outputs)` receives every routed (token, expert) row's unweighted expert
        output (REAP); `progress(layer_idx, n_layers)` follows each layer."""
        import torch

        report = StreamReport(layers=len(self.layers), batches=len(batches))
        groups = [g for g in self._groups if g]
        if groups:
            report.expert_groups = max(len(g) for g in groups)
            report.experts_per_group = max(stop - start for g in groups for start, stop in g)
        decoder = self.model.base_model
        real_layers = list(self.layers)
        calls_per_batch: list[list] = []
        started = time.perf_counter()
        self._load(self._outer)
        report.load_seconds += time.perf_counter() - started
        prefetch = self._prefetch(0)
        stores: list[HiddenStore] = []
        try:
            # 1. embeddings and the arguments every layer gets
            shapes = []
            table = self._embedding_rows(batches)
            for ids, mask in batches:
                calls: list = []
                recorders = [_LayerInputs(layer, calls).module for layer in real_layers]
                decoder.layers = torch.nn.ModuleList(recorders)
                inputs = {"input_ids": ids.to(self.device)}
                if table is not None:
                    rows, vectors = table
                    inputs = {"inputs_embeds": vectors[torch.searchsorted(rows, ids)].to(self.device)}
                try:
                    with torch.no_grad():
                        decoder(**inputs, attention_mask=mask.to(self.device), use_cache=False)
                finally:
                    decoder.layers = self.layers
                if len(calls) != len(real_layers):
                    raise StreamingError(f"{type(decoder).__name__}: ran {len(calls)} of {len(real_layers)} layers in the embedding pass")
                calls_per_batch.append(calls)
                shapes.append(tuple(calls[0][0].shape))
                report.tokens += int(mask.sum())
            _to_meta_outer(self.model, self._outer)
            table = None
            flat_shapes = [(_numel(shape[:-1]), shape[-1]) for shape in shapes]
            hidden_total = sum(_numel(shape) for shape in shapes) * (2 * torch_dtype_size(self.dtype) + 4)
            spill = hidden_budget_bytes is not None and hidden_total > hidden_budget_bytes
            budget = 0 if spill else None
            hidden = HiddenStore(shapes, self.dtype, budget, spill_dir)
            stores.append(hidden)
            expert_inputs = HiddenStore(flat_shapes, self.dtype, budget, spill_dir)
            stores.append(expert_inputs)
            sums = HiddenStore(flat_shapes, torch.float32, budget, spill_dir)
            stores.append(sums)
            report.hidden_bytes, report.spilled = hidden_total, spill
            for batch_idx, calls in enumerate(calls_per_batch):
                hidden.put(batch_idx, calls[0][0])
                for call_idx, (_, args, kwargs) in enumerate(calls):
                    calls[call_idx] = (None, args, kwargs)  # drop the references to the embeddings
            # 2. layer by layer
            for layer_idx, layer in enumerate(real_layers):
                started = time.perf_counter()
                if prefetch is not None:
                    prefetch.join()
                self._load(self._sources[layer_idx])
                prefetch = self._prefetch(layer_idx + 1)
                report.load_seconds += time.perf_counter() - started
                routed = self._run_without_experts(layer_idx, layer, calls_per_batch, hidden, expert_inputs, before_layer, report)
                _to_meta(layer)
                release_freed_memory()
                if routed is not None:
                    self._run_expert_groups(layer_idx, routed, hidden, expert_inputs, sums, before_layer, expert_rows, report)
                if progress is not None:
                    progress(layer_idx, len(real_layers))
        finally:
            if prefetch is not None:
                prefetch.join()
            for store in stores:
                store.close()
            for layer_idx, layer in enumerate(real_layers):
                self._restore_experts(layer_idx)
                _to_meta(layer)
            _to_meta_outer(self.model, self._outer)
        report.bytes_read = self.files.bytes_read
        return report

    def _run_without_experts(self, layer_idx, layer, calls_per_batch, hidden, expert_inputs, before_layer, report):
        """Pass A: the layer with its routed experts answering zero; returns per batch the
        experts' (chosen experts, gate weights), their inputs go to `expert_inputs`."""
        import torch

        experts = self.model.get_submodule(self.arch.experts_module(layer_idx)) if self._expert_sources[layer_idx] else None
        routed: list = []
        current: dict = {}

        def zero_experts(hidden_states, *args, **kwargs):
            top_k_index, top_k_weights = (list(args) + list(kwargs.values()))[:2]  # (chosen experts, gate weights)
            current["inputs"] = hidden_states.reshape(-1, hidden_states.shape[-1])
            current["routing"] = (top_k_index.reshape(current["inputs"].shape[0], -1),
                                  top_k_weights.reshape(current["inputs"].shape[0], -1))
            return torch.zeros_like(hidden_states)

        started = time.perf_counter()
        if experts is not None:
            experts.forward = zero_experts
        try:
            with torch.no_grad():
                for batch_idx, calls in enumerate(calls_per_batch):
                    if before_layer is not None:
                        before_layer(layer_idx, batch_idx)
                    _, args, kwargs = calls[layer_idx]
                    current.clear()
                    out = layer(hidden.get(batch_idx).to(self.device), *args, **kwargs)
                    hidden.put(batch_idx, out[0] if isinstance(out, tuple) else out)
                    if experts is not None:
                        if "inputs" not in current:
                            raise StreamingError(f"layer {layer_idx}: the routed experts were not called")
                        expert_inputs.put(batch_idx, current["inputs"])
                        routed.append(tuple(t.detach() for t in current["routing"]))
        finally:
            if experts is not None:
                del experts.forward
        report.compute_seconds += time.perf_counter() - started
        return routed if experts is not None else None

    def _run_expert_groups(self, layer_idx, routed, hidden, expert_inputs, sums, before_layer, expert_rows, report):
        """Pass B: routed experts group by group; each (token, expert) row is computed once."""
        import torch

        experts = self.model.get_submodule(self.arch.experts_module(layer_idx))
        n_experts = experts.num_experts
        for batch_idx in range(len(routed)):
            sums.put(batch_idx, torch.zeros(sums.shapes[batch_idx], dtype=torch.float32))
        try:
            for start, stop in self._groups[layer_idx]:
                started = time.perf_counter()
                self._load(self._expert_sources[layer_idx], (start, stop))
                experts.num_experts = stop - start
                report.load_seconds += time.perf_counter() - started
                started = time.perf_counter()
                with torch.no_grad():
                    for batch_idx, (chosen, weights) in enumerate(routed):
                        token_idx, slot = ((chosen >= start) & (chosen < stop)).nonzero(as_tuple=True)
                        if token_idx.numel() == 0:
                            continue
                        if before_layer is not None:
                            before_layer(layer_idx, batch_idx)
                        inputs = expert_inputs.get(batch_idx).to(self.device)
                        total = sums.get(batch_idx)
                        # rows in chunks: activations stay bounded however the router concentrates traffic
                        for first in range(0, token_idx.numel(), EXPERT_ROW_CHUNK):
                            tokens = token_idx[first:first + EXPERT_ROW_CHUNK]
                            slots = slot[first:first + EXPERT_ROW_CHUNK]
                            expert_idx = chosen[tokens, slots]
                            gate = weights[tokens, slots]
                            ones = torch.ones((tokens.numel(), 1), dtype=weights.dtype, device=weights.device)
                            outputs = type(experts).forward(experts, inputs[tokens], (expert_idx - start).unsqueeze(1), ones)
                            if expert_rows is not None:
                                expert_rows(layer_idx, batch_idx, tokens, expert_idx, gate, outputs)
                            weighted = outputs.float().mul_(gate.float().unsqueeze(1))
                            total.index_add_(0, tokens.cpu(), weighted.cpu())
                            del outputs, weighted
                        sums.put(batch_idx, total)
                report.compute_seconds += time.perf_counter() - started
                self._restore_experts(layer_idx)
                release_freed_memory()
        finally:
            experts.num_experts = n_experts
            self._restore_experts(layer_idx)
        for batch_idx in range(len(routed)):
            out = hidden.get(batch_idx)
            hidden.put(batch_idx, out + sums.get(batch_idx).to(out.dtype).view(out.shape))

    def _restore_experts(self, layer_idx: int) -> None:
        """The experts' parameters back to their full-size meta tensors (frees a group)."""
        for target, like in self._expert_meta[layer_idx].items():
            _set_tensor(self.model, target, like)

    def close(self) -> None:
        self.files.close()
        self.reader.close()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim). Between layers the
    process frees hundreds of MB of medium-sized buffers that the heap would otherwise keep, so
    resident memory would creep up layer after layer. No-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    if "trim" not in _LIBC:
        import ctypes
        import ctypes.util

        try:
            _LIBC["trim"] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC["trim"] = None
    return _LIBC["trim"]


_LIBC: dict = {}


def torch_nn():
    import torch

    return torch.nn


def torch_dtype_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _to_meta_outer(model, sources: dict) -> None:
    import torch

    for target in sources:
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        value = owner._parameters.get(attr)
        if value is not None:
            owner._parameters[attr] = torch.nn.Parameter(value.detach().to("meta"), requires_grad=False)
        elif owner._buffers.get(attr) is not None:
            owner._buffers[attr] = owner._buffers[attr].to("meta")


def _module_path(root, target) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise StreamingError(f"module {type(target).__name__} is not part of {type(root).__name__}")
