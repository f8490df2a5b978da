"""Writing an ONNX graph whose weights never sit in memory together.

`ExternalData` appends each initializer's bytes to one data file as the tensor is produced
(whole or in chunks) and hands back a TensorProto that points at them; the protobuf holds
only names, shapes and offsets, so a model of any size (far beyond protobuf's 2 GiB) is
written with one tensor (or one chunk of one) in memory. `GraphBuilder` collects nodes,
constants and graph inputs/outputs with unique names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONTRIB_DOMAIN = "com.microsoft"
# ONNX Runtime memory-maps external tensors whose offset is page aligned; small ones need only
# the element alignment
PAGE_ALIGN_BYTES = 4096
PAGE_ALIGN_FROM_BYTES = 1024**2
ELEMENT_ALIGN_BYTES = 64

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32}


class ExternalData:
    """One external-data file, written front to back."""

    def __init__(self, path: Path, location: str):
        self.path = Path(path)
        self.location = location
        self._handle = open(self.path, "wb")
        self.offset = 0
        self.bytes_written = 0

    def _align(self, nbytes: int) -> None:
        align = PAGE_ALIGN_BYTES if nbytes >= PAGE_ALIGN_FROM_BYTES else ELEMENT_ALIGN_BYTES
        pad = -self.offset % align
        if pad:
            self._handle.write(b"\0" * pad)
            self.offset += pad

    def tensor(self, name: str, dtype, shape: Iterable[int], chunks: Iterable[np.ndarray]) -> TensorProto:
        """Write `chunks` (arrays of `dtype`, in C order, together `shape`) as initializer `name`."""
        dtype = np.dtype(dtype)
        shape = [int(d) for d in shape]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._align(nbytes)
        start, written = self.offset, 0
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            self._handle.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
        if written != nbytes:
            raise ValueError(f"initializer {name!r}: wrote {written} bytes for shape {shape} ({nbytes} expected)")
        self.offset += written
        self.bytes_written += written
        proto = TensorProto()
        proto.name = name
        proto.data_type = NP_TO_ONNX[dtype]
        proto.dims.extend(shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()


class GraphBuilder:
    """Nodes, initializers and signature of one graph; every name it makes is unique."""

    def __init__(self, data: ExternalData):
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: dict[str, int] = {}
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        n = self._counts.get(hint, 0)
        self._counts[hint] = n + 1
        return f"{hint}_{n}" if n else hint

    def op(self, op_type: str, inputs: list[str], n_outputs: int = 1, *, name: str | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        node_name = self.fresh(name or op_type)
        outputs = [f"{node_name}/out{i}" if n_outputs > 1 else f"{node_name}/out" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain, **attrs))
        return outputs[0] if n_outputs == 1 else outputs

    def const(self, value, dtype=np.float32) -> str:
        """A small constant (inline in the protobuf), shared between equal values."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def weight(self, name: str, dtype, shape, chunks) -> str:
        """A large initializer streamed to the external-data file."""
        self.initializers.append(self.data.tensor(name, dtype, shape, chunks))
        return name

    def small_weight(self, name: str, array: np.ndarray) -> str:
        """A small initializer (norm weights, biases) under a fixed name, also external."""
        return self.weight(name, array.dtype, array.shape, [array])

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh(f"{name}/identity")))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, opset: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(CONTRIB_DOMAIN, 1)],
                                 producer_name="edge-translation-packager")
