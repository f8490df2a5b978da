"""The checkpoint's weights as the ONNX builder asks for them: one tensor, one row range or
one expert at a time, as float32 numpy, read from the shards with pread.

Names are those of the transformers model (its in-memory layout: per-expert keys stacked,
MXFP4 blocks dequantised, quantized linears dequantised), taken from a skeleton whose
parameters live on the meta device; where each lives on disk is packager.core.stream_weights's
business (`layer_sources`, `build_tensor`, `ShardFiles`), so this module adds no reader."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024**2  # float32 bytes per streamed row chunk


class CheckpointWeights:
    """Read access to every parameter of a (pruned) checkpoint, without loading it."""

    def __init__(self, model_dir: Path):
        import torch

        from packager.core.arch import load_arch
        from packager.core.checkpoint import CheckpointReader
        from packager.core.stream_weights import ShardFiles, TensorSource, _init_dtype_codes, build_skeleton, layer_sources
        from packager.core.quant_formats import logical_tensors

        _init_dtype_codes()
        self.model_dir = Path(model_dir)
        self.reader = CheckpointReader(self.model_dir)
        self.config = dict(self.reader.config)
        self.arch = load_arch(self.config)
        self.skeleton = build_skeleton(self.model_dir, "float32")
        self.files = ShardFiles(self.reader)
        logical = logical_tensors(self.reader)
        present = set(logical)
        quantized = {name: tuple(linear.parts.values()) for name, linear in logical.items() if linear is not None}
        self.meta = dict(self.skeleton.named_parameters())
        self.meta.update(dict(self.skeleton.named_buffers()))
        self.sources: dict = {}
        layers = self.skeleton.model.layers
        self.n_layers = len(layers)
        for layer_idx, layer in enumerate(layers):
            targets = [f"model.layers.{layer_idx}.{name}" for name in layer.state_dict(keep_vars=True)]
            self.sources.update(layer_sources(self.arch, self.config, layer_idx, targets, present, quantized))
        for name in self.meta:
            if not name.startswith("model.layers.") and name in present:
                self.sources[name] = TensorSource("dequant", ((name,),), tuple(quantized[name])) if name in quantized \
                    else TensorSource("direct", ((name,),))
        self._torch = torch

    # ------------------------------------------------------------------ facts
    def has(self, name: str) -> bool:
        return name in self.sources

    def shape(self, name: str) -> list[int]:
        """The tensor's shape: on disk for direct reads (a pruned layer's router has its own
        expert count), else the model's."""
        source = self.sources.get(name)
        if source is not None and source.kind == "direct":
            return list(self.reader.info(source.names[0][0]).shape)
        return list(self.meta[name].shape)

    def rotary(self):
        return self.skeleton.model.rotary_emb

    def n_experts(self, layer_idx: int) -> int:
        return self.arch.n_experts(self.config, layer_idx)

    def same_storage(self, a: str, b: str) -> bool:
        """Whether two parameters are one tensor on disk (tied embeddings)."""
        if a not in self.sources or b not in self.sources:
            return False
        return self.sources[a].disk_names() == self.sources[b].disk_names()

    # ------------------------------------------------------------------ reads
    def _build(self, name: str, rows: tuple[int, int] | None):
        from packager.core.stream_weights import build_tensor

        source = self.sources.get(name)
        if source is None:
            from converters.onnx.errors import OnnxExportError

            raise OnnxExportError(f"{self.model_dir}: tensor {name!r} has no source in the checkpoint's shards")
        like = self.meta[name]
        if source.kind == "direct":
            like = self._torch.empty(self.shape(name), dtype=like.dtype, device="meta")
        return build_tensor(self.files, source, like, self._torch.float32, rows)

    def array(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (for tensors that fit comfortably: norms, biases, one linear)."""
        return self._build(name, None).float().numpy()

    def row_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The tensor in row ranges along dim 0, float32, about `chunk_bytes` each."""
        shape = self.shape(name)
        source = self.sources.get(name)
        if source is not None and source.kind != "direct":  # dequantised linears: one at a time
            yield self.array(name)
            return
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * 4)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, shape[0], step):
            yield self._build(name, (start, min(start + step, shape[0]))).float().numpy()

    def expert(self, name: str, expert_idx: int) -> np.ndarray:
        """Expert `expert_idx` of a stacked expert tensor (dim 0 = experts), float32, without dim 0."""
        return self._build(name, (expert_idx, expert_idx + 1))[0].float().numpy()

    def close(self) -> None:
        self.files.close()
        self.reader.close()
