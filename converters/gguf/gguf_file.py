"""Reading GGUF files safely (gguf-py's memory-mapped reader behind clear errors) and the
model facts this packager needs from them: family, MoE layers, expert counts, top-k and the
model fingerprint (computed from the F32 routers, equal to the safetensors fingerprint)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.gguf.errors import GGUFFileError
from converters.gguf.families import KEY_FAMILY, KEY_MOE_LAYERS, GGUFFamily, family_of_gguf_arch, gguf_family
from packager.core.fingerprint import fingerprint_from_parts

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | Path):
    """A GGUFReader for `path`, or GGUFFileError naming what is wrong."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"{path}: GGUF file not found")
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFFileError(f"{path}: not a GGUF file (starts with {magic!r}); give a .gguf written by llama.cpp or `packager export gguf`")
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises ValueError / IndexError / struct errors on damaged files
        raise GGUFFileError(f"{path}: corrupt or truncated GGUF ({type(exc).__name__}: {exc}); re-export or re-copy it") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise GGUFFileError(
                f"{path}: truncated GGUF: tensor {tensor.name!r} needs bytes up to {end}, the file has {size}; re-export or re-copy it"
            )
    return reader


def field_value(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


@dataclass(frozen=True)
class GGUFModelFacts:
    path: Path
    gguf_arch: str
    fam: GGUFFamily
    moe_layers: list[int]
    n_experts: dict[int, int]     # layer_idx -> experts (router rows)
    top_k: int

    @property
    def family(self) -> str:
        return self.fam.family


def model_facts(reader, path: str | Path) -> GGUFModelFacts:
    path = Path(path)
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise GGUFFileError(f"{path}: GGUF has no general.architecture")
    family = field_value(reader, KEY_FAMILY)
    fam = gguf_family(family) if family else family_of_gguf_arch(arch)
    if fam.gguf_arch != arch:
        raise GGUFFileError(f"{path}: {KEY_FAMILY}={family!r} does not match general.architecture={arch!r}")
    tensors = {t.name: t for t in reader.tensors}
    block_count = field_value(reader, fam.key("block_count"))
    if block_count is None:
        raise GGUFFileError(f"{path}: GGUF has no {fam.key('block_count')}")
    layers = field_value(reader, KEY_MOE_LAYERS)
    if layers is None:
        layers = [layer_idx for layer_idx in range(block_count) if fam.router_name(layer_idx) in tensors]
    if not layers:
        raise GGUFFileError(f"{path}: GGUF has no expert routers ({fam.router_name(0)}): not a mixture-of-experts model")
    counts = {}
    for layer_idx in layers:
        router = tensors.get(fam.router_name(layer_idx))
        if router is None:
            raise GGUFFileError(f"{path}: MoE layer {layer_idx} has no router tensor {fam.router_name(layer_idx)!r}")
        counts[layer_idx] = int(router.shape[1]) if len(router.shape) > 1 else 1  # gguf shape is ne: [hidden, n_experts]
    top_k = field_value(reader, fam.key("expert_used_count"))
    if top_k is None:
        raise GGUFFileError(f"{path}: GGUF has no {fam.key('expert_used_count')}")
    return GGUFModelFacts(path, arch, fam, list(layers), counts, int(top_k))


def router_array(reader, facts: GGUFModelFacts, layer_idx: int) -> np.ndarray:
    from gguf import GGMLQuantizationType

    tensor = next(t for t in reader.tensors if t.name == facts.fam.router_name(layer_idx))
    if tensor.tensor_type not in (GGMLQuantizationType.F32,):
        raise GGUFFileError(
            f"{facts.path}: router {tensor.name!r} is {tensor.tensor_type.name}, not F32; its fingerprint cannot be checked "
            f"(llama.cpp's quantizer keeps routers F32: was this file quantized by another tool?)"
        )
    return np.asarray(tensor.data, dtype=np.float32).reshape(facts.n_experts[layer_idx], -1)


def gguf_fingerprint(reader, path: str | Path) -> str:
    """packager.core.fingerprint's model fingerprint, computed from the GGUF's routers."""
    facts = model_facts(reader, path)
    routers = (router_array(reader, facts, layer_idx) for layer_idx in facts.moe_layers)
    return fingerprint_from_parts(facts.family, facts.moe_layers, [facts.n_experts[i] for i in facts.moe_layers],
                                  facts.top_k, routers)


def file_type_name(reader, facts: GGUFModelFacts | None = None) -> str:
    """The file's type as llama.cpp's quantizer names it ("F32", "F16", "Q8_0", "Q4_K_M"):
    `general.file_type`, else the tensor type of the first MoE layer's experts."""
    from gguf import LlamaFileType

    file_type = field_value(reader, "general.file_type")
    if file_type is not None:
        try:
            return LlamaFileType(int(file_type)).name.replace("MOSTLY_", "").replace("ALL_", "")
        except (TypeError, ValueError):
            pass
    if facts is not None:
        names = set(facts.fam.expert_names(facts.moe_layers[0]).values())
        for tensor in reader.tensors:
            if tensor.name in names:
                return tensor.tensor_type.name
    return "unknown"
