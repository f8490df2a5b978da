"""The weights of a streamed run: a transformers skeleton with its parameters on the meta device,
where each in-memory tensor lives on disk (packager.core.arch facts: router names, per-expert, fused,
MXFP4 and quantized layouts), reading tensors with pread into ordinary memory (no memory map
growing with the checkpoint), building the in-memory tensors, and freeing them again. Used by
streamed calibration (packager.core.layer_stream) and the streaming ONNX export."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packager.core.errors import CheckpointError
from packager.core.execution import StreamingError, torch_dtype

logger = logging.getLogger(__name__)


def _safetensors_torch_dtype(code: str):
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    if code not in table:
        raise CheckpointError(f"safetensors dtype {code!r} cannot be read for streamed execution")
    return table[code]


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
    from packager.core.pruned_model import apply_config_top_k

    return apply_config_top_k(model)


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
    # quantized linears (packager.core.quant_formats), dequantised on read; `physical` lists their files' tensors
    physical: tuple[str, ...] = ()

    def disk_names(self) -> list[str]:
        return list(self.physical) or [name for group in self.names for name in group]


def layer_sources(arch, config: dict, layer_idx: int, targets: Sequence[str], present,
                  quantized: dict | None = None) -> dict[str, TensorSource]:
    """Disk sources of the in-memory tensors `targets` (full names) of decoder layer `layer_idx`.
    `present` holds the checkpoint's logical tensor names; `quantized` maps the logical weight of
    each quantized linear to its on-disk parts (packager.core.quant_formats.logical_tensors).

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
        from packager.core.mxfp4 import dequantize_mxfp4

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

    from packager.core.quant_formats import logical_tensors

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
