"""Layer-streamed execution of a safetensors parent: run a model that does not fit in memory.

Execution goes layer by layer over all sequences (packager.core.stream_weights builds the meta
skeleton and reads the tensors; packager.core.execution decides whether to stream at all):

1. the embedding rows of the tokens in use are read; a pass through the decoder with every
   layer replaced by a recorder gives each batch's embedded hidden states and the exact
   arguments the model hands its layers (masks, positions, rotary tables, per layer, so
   sliding-window layers get theirs);
2. each decoder layer runs in two passes (StreamedModel): the layer without its routed experts,
   then the routed experts read in groups, each computing only the rows routed to it. While a
   layer computes, the kernel is already reading the next layer's byte ranges (posix_fadvise
   WILLNEED), so the disk works while the CPU does;
3. hidden states stay in memory while they fit a budget and otherwise live in a spill file.

The LM head is never loaded: teacher-forced routing capture needs only the decoder.
Forward hooks on the skeleton's modules (packager.calibrate.RoutingRecorder) see the
materialised layers exactly as in a whole model: the modules are the same objects."""
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

from packager.core.errors import CheckpointError
from packager.core.execution import StreamingError, numel, torch_dtype, torch_dtype_size
from packager.core.stream_weights import (
    ShardFiles, TensorSource, _init_dtype_codes, _module_path, _set_tensor, _to_meta, _to_meta_outer,
    build_skeleton, build_tensor, decoder_layers, layer_sources,
)

logger = logging.getLogger(__name__)

# ---- hidden states: memory or spill file ------------------------------------------------------------
class HiddenStore:
    """Hidden states of every batch between layers: in memory, or in one spill file (pread /
    pwrite per batch, so resident memory stays one batch)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype, budget_bytes: int | None, spill_dir: Path | None):
        import torch

        self.shapes = list(shapes)
        self.dtype = dtype
        element = torch.empty((), dtype=dtype).element_size()
        self.sizes = [element * numel(shape) for shape in self.shapes]
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
        from packager.core.arch import load_arch
        from packager.core.checkpoint import CheckpointReader

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
        from packager.core.quant_formats import logical_tensors

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
        per_expert = sum(numel(meta[t].shape) // n_experts for t in experts) * element
        size = max(1, min(n_experts, self.expert_group_bytes // max(1, per_expert)))
        return [(start, min(start + size, n_experts)) for start in range(0, n_experts, size)]

    def _tensor_bytes(self, sources: dict, rows: tuple[int, int] | None = None) -> int:
        meta = dict(self.model.named_parameters())
        meta.update(dict(self.model.named_buffers()))
        total = 0
        for target in sources:
            count = numel(meta[target].shape)
            if rows is not None:
                count = count // meta[target].shape[0] * (rows[1] - rows[0])
            total += count * torch_dtype_size(self.dtype)
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
        real_layers = list(self.layers)
        started = time.perf_counter()
        self._load(self._outer)
        report.load_seconds += time.perf_counter() - started
        prefetch = self._prefetch(0)
        stores: list[HiddenStore] = []
        try:
            # 1. embeddings and the arguments every layer gets
            calls_per_batch, shapes = self._embedding_pass(batches, real_layers, report)
            _to_meta_outer(self.model, self._outer)
            flat_shapes = [(numel(shape[:-1]), shape[-1]) for shape in shapes]
            hidden_total = sum(numel(shape) for shape in shapes) * (2 * torch_dtype_size(self.dtype) + 4)
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

    def _embedding_pass(self, batches: Sequence[tuple], real_layers: list, report: StreamReport) -> tuple[list, list]:
        """Run the embeddings with every layer replaced by a recorder of its arguments: per batch, the
        (hidden, args, kwargs) each layer is called with, and the hidden states' shapes."""
        import torch

        decoder = self.model.base_model
        calls_per_batch, shapes = [], []
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
        return calls_per_batch, shapes

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
