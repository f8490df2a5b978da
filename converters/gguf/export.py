"""Hugging Face MoE checkpoint (parent or pruned) -> GGUF for stock llama.cpp.

Streaming: tensor infos are declared first, then every tensor is read (memory-mapped),
converted and written one at a time; stacked expert tensors are written expert by expert,
so peak memory is about one expert matrix, never the model. The file appears atomically
(temporary sibling, fsync, rename) with its export config `FILE.export.json` beside it.

What is written: architecture hyperparameters, one expert count (llama.cpp reads one per
model, so non-uniform pruned checkpoints are refused with the way out), stacked expert
tensors renumbered 0..n-1 in kept order, routers as F32 (so the model fingerprint can be
computed from the GGUF), the byte-level BPE tokenizer, the chat template, and provenance
(`packager.*` keys: model and parent fingerprints, plan, version, input hashes).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from converters.gguf.errors import GGUFExportError
from converters.gguf.families import (
    HEAD_DIM, KEY_FAMILY, KEY_FINGERPRINT, KEY_MOE_LAYERS, KEY_PARENT_FINGERPRINT, KEY_PLAN, KEY_SOURCE, KEY_VERSION,
    N_EXPERTS, ROPE_FACTOR, ROPE_ORIGINAL_CONTEXT, ROPE_THETA, ROPE_TYPE, TOP_K, FusedPart, GGUFFamily, gguf_family,
)
from converters.gguf.vocab import GGUFVocab, read_vocab
from packager import __version__
from packager.core.arch import PER_LAYER_COUNTS_KEY, PER_LAYER_TOP_K_KEY, MoEArch, load_arch
from packager.core.checkpoint import CheckpointReader
from packager.core.errors import CheckpointError, OutputExistsError
from packager.core.fingerprint import bytes_to_float32, file_sha256, model_fingerprint
from packager.core.mxfp4 import dequantize_mxfp4
from packager.prune import read_provenance
from packager.core.quant_formats import logical_shape, logical_tensors, physical_names, read_float32
from packager.core.provenance import created_unix, versions

logger = logging.getLogger(__name__)

DTYPES = ("f32", "f16")
CHUNK_BYTES = 32 * 1024**2  # source bytes converted at a time for large 2-D tensors


@dataclass
class PlannedTensor:
    """One GGUF tensor: its numpy-order shape, output dtype and a writer of its data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Callable[[], Iterator[np.ndarray]]   # yields arrays whose bytes concatenate to the tensor

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class _Streamed:
    """Stands in for a numpy array in GGUFWriter.write_tensor_data (which only uses `nbytes`
    and `tofile`), so a stacked tensor never exists in memory as a whole."""

    def __init__(self, planned: PlannedTensor, on_bytes: Callable[[int], None] | None = None):
        self.planned = planned
        self.nbytes = planned.nbytes
        self.on_bytes = on_bytes  # progress in chunks; write_gguf sets it

    def tofile(self, fout) -> None:
        written = 0
        for chunk in self.planned.chunks():
            chunk = np.ascontiguousarray(chunk, dtype=self.planned.dtype.newbyteorder("<"))
            chunk.tofile(fout)
            written += chunk.nbytes
            if self.on_bytes:
                self.on_bytes(chunk.nbytes)
        if written != self.nbytes:
            raise GGUFExportError(f"tensor {self.planned.name!r}: wrote {written} bytes, expected {self.nbytes}")


def write_gguf(out_file: Path, arch: str, endianess, fill: Callable, payloads: Sequence, progress: bool, label: str) -> None:
    """Write a GGUF atomically (runtime.atomic.atomic_output): `fill(writer)` adds the metadata
    and the tensor infos, then `payloads` (objects with `nbytes` and `tofile`, in the order of
    the infos) are streamed; a payload with an `on_bytes` attribute reports its own progress.
    Nothing appears at `out_file` unless every byte was written."""
    from gguf import GGUFWriter

    from runtime.atomic import atomic_output

    total = sum(int(p.nbytes) for p in payloads)
    with atomic_output(out_file, needed_bytes=total) as tmp:
        writer = GGUFWriter(tmp, arch, endianess=endianess)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with progress_bar(progress, total, label) as advance:
                for payload in payloads:
                    reports = hasattr(payload, "on_bytes")
                    if reports:
                        payload.on_bytes = advance
                    writer.write_tensor_data(payload, tensor_endianess=endianess)
                    if advance and not reports:
                        advance(payload.nbytes)
        finally:
            writer.close()


def quantized_path(out_file: str | Path, quant: str) -> Path:
    """FILE.gguf -> FILE.Q4_K_M.gguf"""
    out_file = Path(out_file)
    return out_file.with_name(f"{out_file.stem}.{quant}{out_file.suffix}")


# -------------------------------------------------------------------------------- checks
def _config_value(config: dict, source: str, n_experts: int, top_k: int):
    if source == N_EXPERTS:
        return n_experts
    if source == TOP_K:
        return top_k
    if source == HEAD_DIM:
        return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if source == ROPE_THETA:
        return rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if source == ROPE_TYPE:
        return rope.get("rope_type", rope.get("type"))
    if source == ROPE_FACTOR:
        return rope.get("factor")
    if source == ROPE_ORIGINAL_CONTEXT:
        return rope.get("original_max_position_embeddings")
    return config.get(source)


def _check_supported(model_dir: Path, config: dict, arch: MoEArch, fam: GGUFFamily) -> None:
    where = model_dir / "config.json"
    if PER_LAYER_COUNTS_KEY in config and not arch.is_uniform(config):
        counts = {layer_idx: arch.n_experts(config, layer_idx) for layer_idx in arch.moe_layers(config)}
        raise GGUFExportError(
            f"{where}: this pruned model keeps different expert counts per layer {counts}, but stock llama.cpp "
            f"reads one expert count per model and would not load it; make a uniform plan "
            f"(`packager plan create ... --uniform`) and prune again, or export to ONNX (`packager export onnx`)"
        )
    ks = arch.layer_top_ks(config)
    if len(set(ks)) > 1:
        raise GGUFExportError(
            f"{where}: {PER_LAYER_TOP_K_KEY} gives the MoE layers different top-k ({','.join(map(str, ks))}), but "
            f"llama.cpp reads one {fam.key('expert_used_count')} per model; export to ONNX (`packager export onnx`), "
            f"which takes a k per layer, or reduce with one k for every layer (`packager prune --top-k K`)"
        )
    for key, wanted in fam.requires.items():
        value = config.get(key, wanted)
        if value != wanted:
            raise GGUFExportError(
                f"{where}: {key}={value!r}, but llama.cpp's {fam.gguf_arch} graph assumes {key}={wanted!r}; "
                f"the GGUF would compute a different model. Export to ONNX instead"
            )
    for key in fam.requires_absent:
        if config.get(key) not in (None, 0, False):
            raise GGUFExportError(f"{where}: {key}={config[key]!r} is not supported by llama.cpp's {fam.gguf_arch} export here")
    for key, other in fam.requires_equal:
        if config.get(key, config.get(other)) != config.get(other):
            raise GGUFExportError(
                f"{where}: {key}={config.get(key)!r} differs from {other}={config.get(other)!r}, which llama.cpp's "
                f"{fam.gguf_arch} graph requires to be equal; export to ONNX instead"
            )
    for key, other in fam.requires_equal:
        if config.get(key, config.get(other)) != config.get(other):
            raise GGUFExportError(
                f"{where}: {key}={config.get(key)!r} differs from {other}={config.get(other)!r}, which llama.cpp's "
                f"{fam.gguf_arch} graph requires to be equal; export to ONNX instead"
            )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in fam.rope_types:
        raise GGUFExportError(
            f"{where}: rope type {rope_type!r} is not supported by the {fam.gguf_arch} GGUF export (expected "
            f"{' or '.join(fam.rope_types)})"
        )
    if rope_type == "yarn" and rope.get("truncate", True) is False:
        # llama.cpp always rounds YaRN's correction range (transformers' truncate=True)
        logger.warning(
            "%s: rope yarn with truncate=false: llama.cpp rounds the YaRN correction range, so its logits differ "
            "slightly from transformers (as for every GGUF of this model)", where)
    n_layers = arch.n_layers(config)
    if fam.all_layers_moe and arch.moe_layers(config) != list(range(n_layers)):
        dense = sorted(set(range(n_layers)) - set(arch.moe_layers(config)))
        raise GGUFExportError(
            f"{where}: layers {dense} are dense MLP layers, which llama.cpp's {fam.gguf_arch} graph does not have; "
            f"export to ONNX instead"
        )


# -------------------------------------------------------------------------------- tensors
def _read(reader: CheckpointReader, name: str, rows=None) -> bytes:
    """A tensor's bytes (or some rows) with pread, not mmap: every byte is read once, and
    memory-mapped pages would otherwise add the whole input to the process RSS."""
    info = reader.info(name)
    ranges = [(info.path, info.offset, info.nbytes)] if rows is None else info.row_ranges(rows)
    parts = []
    for path, offset, length in ranges:
        chunks, done = [], 0
        with open(path, "rb", buffering=0) as handle:
            while done < length:  # one pread returns at most ~2 GiB
                chunk = os.pread(handle.fileno(), min(length - done, 1 << 30), offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) != length:
            raise GGUFExportError(f"{path}: truncated while reading {name!r} ({len(data)} of {length} bytes); re-copy the checkpoint")
        parts.append(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _reader_array(reader: CheckpointReader, name: str) -> np.ndarray:
    """A tensor as float32; a quantized linear (FP8, GPTQ, AWQ, compressed-tensors) under its
    logical name is dequantised exactly (packager.core.quant_formats)."""
    if logical_tensors(reader).get(name) is not None:
        return read_float32(reader, name, read=lambda part: _read(reader, part))
    info = reader.info(name)
    try:
        return bytes_to_float32(_read(reader, name), info.dtype, info.shape)
    except Exception as exc:  # CheckpointError for int / fp8 tensors
        raise GGUFExportError(f"{reader.model_dir}: tensor {name!r} ({info.dtype}) cannot be exported: {exc}") from None


def _permute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary pairs (i, i + d/2) -> llama.cpp's adjacent pairs (2i, 2i + 1), per head."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _out_dtype(array_ndim: int, dtype: str, keep_f32: bool) -> np.dtype:
    if keep_f32 or array_ndim < 2 or dtype == "f32":
        return np.dtype(np.float32)
    return np.dtype(np.float16)


def _per_expert_tensors(reader, arch, fam, layer_idx, n_experts, dtype, used) -> list[PlannedTensor]:
    """Per-expert keys, stacked in expert order 0..n-1 (the kept order after pruning)."""
    planned = []
    gguf_names = fam.expert_names(layer_idx)
    for role in arch.expert_tensor_names(layer_idx, 0):
        names = [arch.expert_tensor_names(layer_idx, expert_idx)[role] for expert_idx in range(n_experts)]
        first_shape = logical_shape(reader, names[0])
        for name in names[1:]:
            if logical_shape(reader, name) != first_shape:
                raise GGUFExportError(f"{reader.model_dir}: expert tensor {name!r} has shape {logical_shape(reader, name)}, "
                                      f"expected {first_shape}")

        def chunks(names=names):
            for name in names:
                yield _reader_array(reader, name)

        planned.append(PlannedTensor(gguf_names[role], (n_experts, *first_shape), _out_dtype(3, dtype, False), chunks))
        used.update(names)
        used.update(part for name in names for part in physical_names(reader, name))
    return planned


def _take_part(array: np.ndarray, part: FusedPart) -> np.ndarray:
    if part.split is not None:
        size = array.shape[part.axis]
        index = {"first_half": slice(0, size // 2), "second_half": slice(size // 2, size),
                 "even": slice(0, size, 2), "odd": slice(1, size, 2)}[part.split]
        array = array[(slice(None),) * part.axis + (index,)]
    return array.T if part.transpose else array


def _part_shape(shape: tuple[int, ...], part: FusedPart) -> tuple[int, ...]:
    shape = list(shape)
    if part.split is not None:
        shape[part.axis] //= 2
    return tuple(reversed(shape)) if part.transpose else tuple(shape)


def _expert_array(reader, name: str, info, expert_idx: int, scales_name: str | None) -> np.ndarray:
    """One expert's slice of a fused tensor as float32 (MXFP4 blocks dequantised)."""
    raw = _read(reader, name, rows=[expert_idx])
    if scales_name is None:
        return bytes_to_float32(raw, info.dtype, info.shape[1:])
    scales_info = reader.info(scales_name)
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(info.shape[1:])
    scales = np.frombuffer(_read(reader, scales_name, rows=[expert_idx]), dtype=np.uint8).reshape(scales_info.shape[1:])
    return dequantize_mxfp4(blocks, scales)


def _fused_tensors(reader, arch, fam, layer_idx, n_experts, dtype, used, layout) -> list[PlannedTensor]:
    """Fused [E, ...] tensors, read expert by expert (row ranges) and cut into GGUF roles."""
    planned = []
    fused_names = arch.fused_expert_names(layer_idx)
    gguf_names = fam.expert_names(layer_idx)
    for role, part in (fam.mxfp4 if layout == "mxfp4" else fam.fused).items():
        name = fused_names.get(part.source)
        if name is None or name not in reader:
            if part.source.endswith("bias"):
                continue
            raise GGUFExportError(f"{reader.model_dir}: fused expert tensor for {part.source!r} of layer {layer_idx} is missing")
        info = reader.info(name)
        if info.shape[0] != n_experts:
            raise GGUFExportError(f"{reader.model_dir}: {name!r} has {info.shape[0]} experts, config.json says {n_experts}")
        scales_name = None
        shape = info.shape[1:]
        if part.source.endswith("_blocks"):
            scales_name = fused_names[part.source[: -len("_blocks")] + "_scales"]
            shape = (info.shape[1], info.shape[2] * 32)  # [out, groups, 16 bytes] -> [out, in]
            used.add(scales_name)

        def chunks(name=name, info=info, part=part, scales_name=scales_name):
            for expert_idx in range(n_experts):
                yield _take_part(_expert_array(reader, name, info, expert_idx, scales_name), part)

        is_bias = len(info.shape) == 2
        planned.append(PlannedTensor(gguf_names[role], (n_experts, *_part_shape(shape, part)),
                                     _out_dtype(3, dtype, keep_f32=is_bias), chunks))
        used.add(name)
    return planned


def plan_tensors(reader: CheckpointReader, config: dict, arch: MoEArch, fam: GGUFFamily, dtype: str) -> list[PlannedTensor]:
    """Every GGUF tensor with its producer; refuses checkpoints with tensors it cannot place."""
    present = set(logical_tensors(reader))  # quantized linears under their logical weight names
    used: set[str] = set()
    planned: list[PlannedTensor] = []
    n_head, n_head_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]

    def plain(hf_name: str, gguf_name: str, keep_f32: bool = False, transform=None) -> None:
        quantized = logical_tensors(reader).get(hf_name) is not None
        info = None if quantized else reader.info(hf_name)
        shape = tuple(logical_shape(reader, hf_name))
        out = _out_dtype(len(shape), dtype, keep_f32)

        def chunks(hf_name=hf_name, transform=transform, info=info):
            if quantized or transform is not None or len(info.shape) < 2:
                array = _reader_array(reader, hf_name)
                yield transform(array) if transform else array
                return
            # big matrices (embeddings, lm_head) in row blocks: memory stays at one block
            rows_per_block = max(1, CHUNK_BYTES // max(1, info.nbytes // info.shape[0]))
            for start in range(0, info.shape[0], rows_per_block):
                rows = range(start, min(start + rows_per_block, info.shape[0]))
                raw = _read(reader, hf_name, rows=rows)
                yield bytes_to_float32(raw, info.dtype, (len(rows), *info.shape[1:]))

        planned.append(PlannedTensor(gguf_name, shape, out, chunks))
        used.add(hf_name)
        used.update(physical_names(reader, hf_name))

    def mapped(table: dict[str, str], layer_idx: int | None) -> None:
        for hf_name, gguf_name in table.items():
            if hf_name not in present:
                if fam.is_optional(hf_name, layer_idx):
                    continue
                raise GGUFExportError(f"{reader.model_dir}: tensor {hf_name!r} is missing; the checkpoint is incomplete")
            transform = None
            if fam.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = n_head if hf_name.endswith("q_proj.weight") else n_head_kv
                transform = lambda a, heads=heads: _permute_rope_rows(a, heads)  # noqa: E731
            plain(hf_name, gguf_name, transform=transform)

    mapped(fam.global_tensors(), None)
    for layer_idx in range(arch.n_layers(config)):
        mapped(fam.layer_tensors(layer_idx), layer_idx)
        if layer_idx not in arch.moe_layers(config):
            continue
        n_experts = arch.n_experts(config, layer_idx)
        plain(arch.router_weight_name(layer_idx), fam.router_name(layer_idx), keep_f32=True)
        for hf_name, gguf_name in (
            (arch.router_bias_name(layer_idx), fam.router_bias_name(layer_idx)),
            (arch.score_bias_name(layer_idx), fam.score_bias_name(layer_idx)),
        ):
            if hf_name and hf_name in present:
                if not gguf_name:
                    raise GGUFExportError(f"{reader.model_dir}: {hf_name!r} has no GGUF tensor in family {fam.family}")
                plain(hf_name, gguf_name, keep_f32=True)
        try:  # a tensor with an expert index that the family does not describe is refused, not left over
            arch.layer_expert_tensors(layer_idx, n_experts, present)
        except CheckpointError as exc:
            raise GGUFExportError(f"{reader.model_dir}: {exc}") from None
        layout = arch.detect_layout(layer_idx, n_experts, present)
        if layout == "per_expert":
            planned += _per_expert_tensors(reader, arch, fam, layer_idx, n_experts, dtype, used)
        elif layout == "fused" or (layout == "mxfp4" and fam.mxfp4):
            planned += _fused_tensors(reader, arch, fam, layer_idx, n_experts, dtype, used, layout)
        else:
            raise GGUFExportError(
                f"{reader.model_dir}: layer {layer_idx} stores experts in the {layout!r} layout, which the GGUF "
                f"export of {fam.family} does not read (per-expert and fused bf16/fp32 tensors only)"
            )

    leftovers = sorted(present - used)
    if leftovers:
        shown = ", ".join(repr(n) for n in leftovers[:4])
        raise GGUFExportError(
            f"{reader.model_dir}: {len(leftovers)} tensor(s) have no place in a {fam.gguf_arch} GGUF "
            f"({shown}{' ...' if len(leftovers) > 4 else ''}); this checkpoint differs from the {fam.family} layout llama.cpp runs"
        )
    return planned


# -------------------------------------------------------------------------------- metadata
def _add_metadata(writer, config: dict, arch: MoEArch, fam: GGUFFamily, vocab: GGUFVocab, n_experts: int,
                  dtype: str, provenance: dict, name: str) -> None:
    from gguf import GGUFValueType, LlamaFileType

    writer.add_name(name)
    writer.add_file_type(LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16)
    top_k = arch.top_k(config)
    for suffix, kind, source in fam.hparams:
        value = _config_value(config, source, n_experts, top_k)
        if value is None:
            raise GGUFExportError(f"config.json: {source!r} is needed for {fam.key(suffix)} but is missing")
        if kind == "u32":
            writer.add_uint32(fam.key(suffix), int(value))
        elif kind == "str":
            writer.add_string(fam.key(suffix), str(value))
        else:
            writer.add_float32(fam.key(suffix), float(value))
        logger.info("gguf: %s = %s", fam.key(suffix), value)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id,
               "unk": writer.add_unk_token_id, "sep": writer.add_sep_token_id}
    for role, token_id in vocab.special_ids.items():
        setters[role](token_id)
    # prompts are rendered from the chat template, which places <bos> itself
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(chat_template_for_plan(vocab.chat_template, provenance.get("plan")))

    writer.add_string(KEY_VERSION, __version__)
    writer.add_string(KEY_FAMILY, arch.family)
    writer.add_string(KEY_FINGERPRINT, provenance["model_fingerprint"])
    if provenance.get("parent_fingerprint"):
        writer.add_string(KEY_PARENT_FINGERPRINT, provenance["parent_fingerprint"])
    if provenance.get("plan"):
        writer.add_string(KEY_PLAN, json.dumps(provenance["plan"], sort_keys=True))
    writer.add_array(KEY_MOE_LAYERS, arch.moe_layers(config))
    writer.add_key_value(KEY_SOURCE, json.dumps(provenance["source"], sort_keys=True), GGUFValueType.STRING)


def _input_hashes(model_dir: Path, reader: CheckpointReader, hash_inputs: bool) -> dict:
    files = {}
    for path in sorted({info.path for info in reader.infos()} | {reader.config_path}):
        entry = {"bytes": path.stat().st_size}
        if hash_inputs:
            entry["sha256"] = file_sha256(path)
        files[str(path.relative_to(model_dir))] = entry
    for side in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / side).is_file():
            files[side] = {"bytes": (model_dir / side).stat().st_size, "sha256": file_sha256(model_dir / side)}
    return files


# -------------------------------------------------------------------------------- main entry
def chat_template_for_plan(template: str, plan: dict | None) -> str:
    """The template with its default direction (what stock chat clients get, see
    runtime.prompt.with_default_direction) set to the plan's first pair; unchanged without a plan."""
    from runtime.errors import LanguageError
    from runtime.languages import parse_pair
    from runtime.prompt import with_default_direction

    for slug in ((plan or {}).get("meta") or {}).get("pairs") or []:
        try:
            pair = parse_pair(slug)
        except (LanguageError, TypeError):
            continue
        return with_default_direction(template, pair.src, pair.tgt)
    return template


def export_gguf(
    model_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    quant: list[str] | str | None = None,
    *,
    dtype: str = "f16",
    force: bool = False,
    hash_inputs: bool = True,
    progress: bool = False,
    n_threads: int | None = None,
) -> Path:
    """Write `out_file` (GGUF, weights at `dtype`) and `FILE.export.json`; with `quant`
    (e.g. ["Q8_0", "Q4_K_M"]) also FILE.<QUANT>.gguf for each type, through llama.cpp's
    quantizer. Returns `out_file`."""
    from converters.gguf.quantize import parse_quant_types, quantize_gguf

    started = time.monotonic()
    model_dir, out_file = Path(model_dir), Path(out_file)
    if dtype not in DTYPES:
        raise GGUFExportError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    quant_types = parse_quant_types(quant)
    if out_file.suffix != ".gguf":
        raise GGUFExportError(f"{out_file}: the output file name must end in .gguf")
    targets = [out_file] + [quantized_path(out_file, q) for q in quant_types]
    for target in targets:
        if target.exists() and not force:
            raise OutputExistsError(f"{target}: output file exists; choose another path or pass --force")
    if not out_file.parent.is_dir():
        raise GGUFExportError(f"{out_file.parent}: output directory does not exist")

    with CheckpointReader(model_dir) as reader:
        config = reader.config
        arch = load_arch(config)
        fam = gguf_family(arch.family)
        _check_supported(model_dir, config, arch, fam)
        moe_layers = arch.moe_layers(config)
        n_experts = arch.n_experts(config, moe_layers[0])
        vocab = read_vocab(model_dir, int(config["vocab_size"]))
        if not vocab.chat_template:
            raise GGUFExportError(f"{model_dir}: no chat template (chat_template.jinja); the runtime needs it to build prompts")
        tensors = plan_tensors(reader, config, arch, fam, dtype)

        fingerprint = model_fingerprint(reader)
        pruned = read_provenance(model_dir) or {}
        parent_fingerprint = pruned.get("parent_fingerprint", fingerprint)
        plan_summary = None
        if pruned:
            plan_summary = {"sha256": pruned.get("plan", {}).get("sha256"), "meta": pruned.get("plan", {}).get("meta", {}),
                            "keep": pruned.get("keep")}
        source = {
            "model_dir": str(model_dir.absolute()),
            "files": _input_hashes(model_dir, reader, hash_inputs),
            "command": sys.argv,
            "versions": versions("gguf", "llama-cpp-python"),
            **created_unix(),  # SOURCE_DATE_EPOCH or nothing: same inputs, same bytes
            "dtype": dtype,
        }
        provenance = {"model_fingerprint": fingerprint, "parent_fingerprint": parent_fingerprint,
                      "plan": plan_summary, "source": source}

        from gguf import GGMLQuantizationType, GGUFEndian

        def fill(writer) -> None:
            _add_metadata(writer, config, arch, fam, vocab, n_experts, dtype, provenance, model_dir.name)
            for tensor in tensors:
                raw = GGMLQuantizationType.F32 if tensor.dtype == np.float32 else GGMLQuantizationType.F16
                writer.add_tensor_info(tensor.name, tensor.shape, tensor.dtype, tensor.nbytes, raw_dtype=raw)

        write_gguf(out_file, fam.gguf_arch, GGUFEndian.LITTLE, fill, [_Streamed(t) for t in tensors], progress,
                   f"export {out_file.name}")
    logger.info("gguf: wrote %s (%d tensors, %.1f MB) in %.1fs", out_file, len(tensors), out_file.stat().st_size / 1e6,
                time.monotonic() - started)

    from converters.gguf.export_config import write_export_config

    write_export_config(out_file, {"type": dtype.upper()})
    for quant_type in quant_types:
        quantize_gguf(out_file, quantized_path(out_file, quant_type), quant_type, force=force, n_threads=n_threads)
    return out_file


class progress_bar:
    """rich progress over bytes written (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(self.label), BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=True)
        task = self.bar.add_task(self.label, total=self.total)
        self.bar.start()
        return lambda nbytes: self.bar.advance(task, nbytes)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
