"""Streaming expert pruning of a safetensors checkpoint.

Every output tensor is a list of byte ranges of the input files: kept experts (per-expert
keys renamed to 0..n-1 in ascending original id with every companion of a quantized weight:
FP8 `weight_scale_inv`, GPTQ/AWQ `qweight`/`qzeros`/`scales`/`g_idx`, compressed-tensors
`weight_packed`/`weight_scale`/`weight_shape`; or rows of fused tensors with the expert
dimension first, MXFP4 blocks/scales included) and router rows are copied in the kernel,
bit for bit, never dequantised, and never held in Python memory. Only config.json and the
provenance file are rewritten. Peak memory does not grow with the model."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from packager.core.arch import PER_LAYER_COUNTS_KEY, MoEArch, load_arch
from packager.core.checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    CheckpointReader,
    CheckpointWriter,
    atomic_write_json,
)
from packager.core.errors import CheckpointError, OutputExistsError
from packager.core.fingerprint import bytes_to_float32, file_sha256, fingerprint_from_parts, model_fingerprint
from packager.core.plan_file import Plan, validate_plan
from packager.core.provenance import created_unix, versions

logger = logging.getLogger(__name__)

PROVENANCE_NAME = "pruning.json"
# Files that are never copied: weights (rewritten) and pickles (never loaded, never shipped).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SKIP_NAMES = {CONFIG_NAME, INDEX_NAME, PROVENANCE_NAME}
# Full sha256 of every input shard up to this size; above it, shard headers are hashed
# (reading every dropped byte would cost more than the prune itself).
FULL_HASH_MAX_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class _Action:
    """What happens to one input tensor: output name and the input rows kept (None = all)."""

    out_name: str
    rows: tuple[int, ...] | None = None


def _classify(reader: CheckpointReader, arch: MoEArch, config: dict, keep: dict[int, list[int]]) -> dict[str, _Action | None]:
    """Action per input tensor (None = dropped). Checks layouts, shapes and quantized linears first.

    The invariant: every tensor that belongs to a routed expert (its weight and every companion
    of its quantization: scales, zeros, group indices, packed shapes) is kept and renumbered, or
    dropped, with that expert; router tensors lose the dropped rows. A tensor that carries an
    expert index but that the family description does not know is refused (arch.layer_expert_tensors)."""
    from packager.core.quant_formats import logical_tensors

    names = set(reader.names())
    suffixes = reader.quant.suffixes()
    claims: dict[int, dict] = {}
    for layer_idx in keep:
        try:
            claims[layer_idx] = arch.layer_expert_tensors(layer_idx, arch.n_experts(config, layer_idx), names, suffixes)
        except CheckpointError as exc:
            raise CheckpointError(f"{reader.model_dir}: {exc}") from None
    present = names | set(logical_tensors(reader))  # checks every quantized linear's companions
    actions: dict[str, _Action | None] = {}
    for layer_idx, kept in keep.items():
        n_experts = arch.n_experts(config, layer_idx)
        claimed = claims[layer_idx]
        reader.info(arch.router_weight_name(layer_idx))  # the router weight must exist
        layout = arch.detect_layout(layer_idx, n_experts, present)
        chosen = set(arch.layout_tensor_names(layout, layer_idx, n_experts))
        other = [n for other_layout in arch.layouts if other_layout != layout
                 for n in arch.layout_tensor_names(other_layout, layer_idx, n_experts) if n in present and n not in chosen]
        other += [n for n, (kind, *_) in claimed.items() if kind == ("fused" if layout == "per_expert" else "expert")
                  and n not in chosen]
        if other:
            raise CheckpointError(
                f"{reader.model_dir}: layer {layer_idx} mixes expert layouts ({layout} plus {other[0]!r}); "
                "re-save the checkpoint with one layout"
            )
        new_idx = {expert_idx: i for i, expert_idx in enumerate(kept)}
        for name, (kind, expert_idx, role, suffix) in claimed.items():
            if kind == "expert":
                actions[name] = (_Action(arch.expert_part_name(layer_idx, new_idx[expert_idx], role, suffix))
                                 if expert_idx in new_idx else None)
                continue
            info = reader.info(name)
            if not info.shape or info.shape[0] != n_experts:
                what = "router tensor" if kind == "router" else "fused expert tensor"
                raise CheckpointError(
                    f"{info.path}: {what} {name!r} has shape {list(info.shape)}, expected the expert dimension "
                    f"first with {n_experts} experts (config.json)"
                )
            actions[name] = _Action(name, tuple(kept))
    for name in names:
        actions.setdefault(name, _Action(name))
    return actions


def _pruned_quantization_config(arch: MoEArch, config: dict, keep: dict[int, list[int]]) -> dict:
    """quantization_config with module-name lists (modules_to_not_convert, ignore, ...) that
    name experts by index renumbered like the experts, dropped experts removed."""
    from packager.core.quant_formats import expert_module_pattern, rename_module_lists

    patterns = {layer_idx: expert_module_pattern(arch.expert_scope(layer_idx)) for layer_idx in keep
                if arch.expert_scope(layer_idx) is not None}

    def rename(module: str) -> str | None:
        for layer_idx, pattern in patterns.items():
            match = pattern.match(module)
            if match:
                old = int(match.group(1))
                if old not in keep[layer_idx]:
                    return None
                return f"{arch.expert_scope(layer_idx)}{keep[layer_idx].index(old)}{match.group(2) or ''}"
        return module

    return rename_module_lists(config["quantization_config"], rename)


def _input_hashes(reader: CheckpointReader, hash_inputs: bool | None) -> tuple[str, dict]:
    shard_bytes = sum(p.stat().st_size for p in reader.shard_paths)
    full = hash_inputs if hash_inputs is not None else shard_bytes <= FULL_HASH_MAX_BYTES
    files: dict[str, dict] = {}
    for path in sorted(reader.model_dir.iterdir()):
        if not path.is_file():
            continue
        entry: dict = {"bytes": path.stat().st_size}
        if path in reader.shard_paths and not full:
            with open(path, "rb") as fh:
                (header_bytes,) = struct.unpack("<Q", fh.read(8))
                entry["header_sha256"] = hashlib.sha256(fh.read(header_bytes)).hexdigest()
        else:
            entry["sha256"] = file_sha256(path)
        files[path.name] = entry
    return ("full" if full else "headers"), files


def _copy_side_files(model_dir: Path, staging: Path) -> list[str]:
    copied = []
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in _SKIP_NAMES and not path.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(path, staging / path.name)
            copied.append(path.name)
        elif path.is_dir():
            logger.info("not copying subdirectory %s", path)
    return copied


def _pruned_config(arch, config: dict, keep: dict[int, list[int]], counts: dict[int, int]) -> dict:
    """The parent's config with the pruned expert counts (and quantization config)."""
    new_config = dict(config)
    for key, value in arch.config_updates_for_counts(config, counts).items():
        if value is None:
            new_config.pop(key, None)
        else:
            new_config[key] = value
    if isinstance(new_config.get("quantization_config"), dict):
        new_config["quantization_config"] = _pruned_quantization_config(arch, config, keep)
    for key in arch.n_experts_keys:
        logger.info("config: %s = %d", key, new_config[key])
    if PER_LAYER_COUNTS_KEY in new_config:
        logger.info("config: %s = %s (non-uniform: load with packager.load_pruned)",
                    PER_LAYER_COUNTS_KEY, new_config[PER_LAYER_COUNTS_KEY])
    return new_config


def _planned_outputs(reader, actions: dict, replacements: dict[str, bytes], model_dir: Path) -> list[tuple]:
    """(out_name, dtype, shape, byte ranges or replacement bytes) of every kept tensor, in input storage
    order; a replacement must be for a kept whole tensor, byte for byte the same size."""
    for name, data in replacements.items():
        action = actions.get(name)
        if action is None or action.rows is not None or len(data) != reader.info(name).nbytes:
            raise CheckpointError(f"{model_dir}: replacement for {name!r} is not a kept whole tensor of "
                                  f"{reader.info(name).nbytes if name in actions else '?'} bytes")
    outputs = []
    for info in reader.infos():
        action = actions[info.name]
        if action is None:
            continue
        if info.name in replacements:
            outputs.append((action.out_name, info.dtype, info.shape, replacements[info.name]))
        elif action.rows is None:
            outputs.append((action.out_name, info.dtype, info.shape, [(info.path, info.offset, info.nbytes)]))
        else:
            shape = (len(action.rows),) + info.shape[1:]
            outputs.append((action.out_name, info.dtype, shape, info.row_ranges(action.rows)))
    return outputs


def prune_checkpoint(model_dir: str | os.PathLike, plan: Plan | str | os.PathLike, out_dir: str | os.PathLike,
                     force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     hash_inputs: bool | None = None, progress: bool = False,
                     replacements: dict[str, bytes] | None = None, extra_provenance: dict | None = None) -> Path:
    """Write a pruned copy of `model_dir` keeping `plan.keep` experts per MoE layer into `out_dir`.

    `replacements` (input tensor name -> bytes of the same dtype and shape) writes new bytes for
    a kept tensor, e.g. merged experts (packager.merge); `extra_provenance` joins pruning.json.
    Everything is validated before anything is written; the output appears atomically."""
    started = time.monotonic()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    if out_dir.exists() and not force:
        raise OutputExistsError(f"{out_dir}: output path exists; choose another path or pass --force")
    if out_dir.absolute() == model_dir.absolute() or model_dir.absolute() in out_dir.absolute().parents:
        raise OutputExistsError(f"{out_dir}: the output must not be the input model directory or inside it")
    with CheckpointReader(model_dir) as reader:
        config = reader.config
        arch = load_arch(config)
        parent_fingerprint = model_fingerprint(reader)
        validate_plan(plan, arch, config, parent_fingerprint)
        keep = {layer_idx: sorted(ids) for layer_idx, ids in plan.keep.items()}
        actions = _classify(reader, arch, config, keep)
        hash_mode, input_files = _input_hashes(reader, hash_inputs)

        counts = {layer_idx: len(ids) for layer_idx, ids in keep.items()}
        new_config = _pruned_config(arch, config, keep, counts)
        outputs = _planned_outputs(reader, actions, replacements or {}, model_dir)
        kept_bytes = sum(len(ranges) if isinstance(ranges, bytes) else sum(length for _, _, length in ranges)
                         for *_, ranges in outputs)
        with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, force=force) as writer:
            bar = _progress_bar(progress, kept_bytes)
            if bar is not None:
                writer.on_written = lambda nbytes: bar[0].advance(bar[1], nbytes)
            try:
                for out_name, dtype, shape, ranges in outputs:
                    if isinstance(ranges, bytes):
                        writer.add_bytes(out_name, dtype, shape, ranges)
                    else:
                        writer.add_ranges(out_name, dtype, shape, ranges)
                new_fingerprint = _pruned_fingerprint(reader, arch, new_config, keep)
                atomic_write_json(writer.staging_dir / CONFIG_NAME, new_config)
                copied = _copy_side_files(model_dir, writer.staging_dir)
                provenance = {
                    "format": "edge-packager-pruned",
                    "version": 1,
                    "family": arch.family,
                    "parent_fingerprint": parent_fingerprint,
                    "model_fingerprint": new_fingerprint,
                    "plan": {"sha256": plan.sha256(), "file": str(plan.source) if plan.source else None, "meta": plan.meta},
                    "keep": {str(layer_idx): ids for layer_idx, ids in sorted(keep.items())},
                    "expert_counts": {str(layer_idx): n for layer_idx, n in sorted(counts.items())},
                    "uniform": len(set(counts.values())) == 1,
                    "input": {"dir": str(model_dir.absolute()), "hash_mode": hash_mode, "files": input_files},
                    "output": {"tensor_bytes": kept_bytes, "input_tensor_bytes": reader.total_bytes,
                               "max_shard_bytes": max_shard_bytes, "copied_files": copied},
                    "command": sys.argv,
                    "versions": versions("safetensors", "torch", "transformers"),
                    **created_unix(),  # SOURCE_DATE_EPOCH or nothing: same inputs, same bytes
                }
                if extra_provenance:
                    provenance.update(extra_provenance)
                    provenance["parent_expert_counts"] = {str(i): arch.n_experts(config, i) for i in sorted(keep)}
                atomic_write_json(writer.staging_dir / PROVENANCE_NAME, provenance)
                out = writer.finalize()
            finally:
                if bar is not None:
                    bar[0].stop()
    logger.info("pruned %s -> %s: %d of %d tensor bytes kept in %.1fs", model_dir, out, kept_bytes,
                reader.total_bytes, time.monotonic() - started)
    return out


def describe_prune(model_dir: str | os.PathLike, plan: Plan | str | os.PathLike) -> dict:
    """Validate `plan` against the model and say what a prune would write; touches no file."""
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    with CheckpointReader(model_dir) as reader:
        arch = load_arch(reader.config)
        validate_plan(plan, arch, reader.config, model_fingerprint(reader))
        keep = {layer_idx: sorted(ids) for layer_idx, ids in plan.keep.items()}
        actions = _classify(reader, arch, reader.config, keep)
        kept_bytes = 0
        for info in reader.infos():
            action = actions[info.name]
            if action is not None:
                kept_bytes += info.nbytes if action.rows is None else info.nbytes // info.shape[0] * len(action.rows)
        counts = {layer_idx: len(ids) for layer_idx, ids in sorted(keep.items())}
        return {
            "family": arch.family,
            "experts_per_layer": {layer_idx: [arch.n_experts(reader.config, layer_idx), n] for layer_idx, n in counts.items()},
            "uniform": len(set(counts.values())) == 1,
            "input_tensor_bytes": reader.total_bytes,
            "output_tensor_bytes": kept_bytes,
        }


def _pruned_fingerprint(reader: CheckpointReader, arch: MoEArch, new_config: dict, keep: dict[int, list[int]]) -> str:
    layers = sorted(keep)

    def routers():
        for layer_idx in layers:
            info = reader.info(arch.router_weight_name(layer_idx))
            raw = reader.read_bytes(info.name, rows=keep[layer_idx])
            yield bytes_to_float32(raw, info.dtype, (len(keep[layer_idx]),) + info.shape[1:])

    return fingerprint_from_parts(arch.family, layers, [len(keep[i]) for i in layers], arch.fingerprint_top_k(new_config), routers())


def _progress_bar(enabled: bool, total_bytes: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn("prune"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                   transient=True)
    task = bar.add_task("prune", total=total_bytes)
    bar.start()
    return bar, task


def read_provenance(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / PROVENANCE_NAME
    if not path.exists():
        return None
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(provenance, dict) and provenance.get("reduce") == "merge":
        from packager.merge import MergeError, check_merge_record

        try:
            check_merge_record(provenance, {int(k): v for k, v in (provenance.get("keep") or {}).items()}, str(path))
        except MergeError as exc:
            raise CheckpointError(str(exc)) from None
    return provenance


__all__ = ["describe_prune", "prune_checkpoint", "read_provenance", "PROVENANCE_NAME"]
