"""Prune an existing GGUF (possibly quantized) without dequantising: for users who only have
the GGUF. The stacked expert tensors and the router rows are sliced along the expert axis
(numpy axis 0 of gguf-py's view; a quantized row is a whole number of blocks, so slicing
whole experts never cuts a block), the expert count is rewritten, every other tensor and
metadata key is copied unchanged. The plan is checked against the fingerprint computed from
the GGUF's F32 routers, so a plan made on the safetensors parent applies to its GGUF too.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from converters.gguf.errors import GGUFExportError, GGUFFileError
from converters.gguf.export import chat_template_for_plan, write_gguf
from converters.gguf.families import KEY_FINGERPRINT, KEY_PARENT_FINGERPRINT, KEY_PLAN, KEY_SOURCE
from converters.gguf.gguf_file import GGUFModelFacts, field_value, gguf_fingerprint, model_facts, open_gguf
from packager import __version__
from packager.core.arch import load_arch
from packager.core.errors import OutputExistsError, PlanError
from packager.core.fingerprint import fingerprint_from_parts
from packager.core.plan_file import Plan, validate_plan
from packager.core.provenance import created_unix

logger = logging.getLogger(__name__)


class _Rows:
    """Selected rows of a memory-mapped array, written one by one (see export._Streamed)."""

    def __init__(self, data: np.ndarray, rows: list[int]):
        self.data, self.rows = data, rows
        self.nbytes = sum(data[row].nbytes for row in rows) if rows else 0

    def tofile(self, fout) -> None:
        for row in self.rows:
            np.ascontiguousarray(self.data[row]).tofile(fout)


def _synthetic_config(facts: GGUFModelFacts, block_count: int):
    """The config.json facts validate_plan needs, read from the GGUF."""
    arch = load_arch({"model_type": facts.family})
    config = {"model_type": facts.family, arch.n_layers_key: block_count, arch.top_k_key: facts.top_k}
    for key in arch.n_experts_keys:
        config[key] = max(facts.n_experts.values())
    return arch, config


def _sliced_tensor_names(facts: GGUFModelFacts, layer_idx: int) -> list[str]:
    fam = facts.fam
    names = list(fam.expert_names(layer_idx).values()) + [fam.router_name(layer_idx)]
    names += [n for n in (fam.router_bias_name(layer_idx), fam.score_bias_name(layer_idx)) if n]
    return names


def _kept_rows(by_name: dict, facts, keep: dict[int, list[int]], in_file: Path) -> dict[str, list[int]]:
    """The expert rows each per-expert tensor keeps; the router and the experts must be there."""
    fam = facts.fam
    rows_of: dict[str, list[int]] = {}
    for layer_idx in facts.moe_layers:
        for name in _sliced_tensor_names(facts, layer_idx):
            tensor = by_name.get(name)
            if tensor is None:
                if name == fam.router_name(layer_idx) or name in fam.expert_names(layer_idx).values():
                    raise GGUFFileError(f"{in_file}: MoE layer {layer_idx} has no tensor {name!r}")
                continue
            if tensor.data.shape[0] != facts.n_experts[layer_idx]:
                raise GGUFFileError(f"{in_file}: tensor {name!r} has {tensor.data.shape[0]} experts, the router has {facts.n_experts[layer_idx]}")
            rows_of[name] = keep[layer_idx]
    return rows_of


def prune_gguf(in_file: str | os.PathLike, plan: Plan | str | os.PathLike, out_file: str | os.PathLike, *,
               force: bool = False, progress: bool = False) -> Path:
    """Write `out_file`: `in_file` keeping `plan.keep` experts per MoE layer (renumbered 0..n-1)."""
    from gguf import GGUFValueType

    from converters.gguf.export_config import write_export_config

    started = time.monotonic()
    in_file, out_file = Path(in_file), Path(out_file)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    if out_file.exists() and not force:
        raise OutputExistsError(f"{out_file}: output file exists; choose another path or pass --force")
    if out_file.suffix != ".gguf":
        raise GGUFExportError(f"{out_file}: the output file name must end in .gguf")
    if out_file.absolute() == in_file.absolute():
        raise OutputExistsError(f"{out_file}: the output must not overwrite the input GGUF")

    reader = open_gguf(in_file)
    facts = model_facts(reader, in_file)
    fam = facts.fam
    block_count = int(field_value(reader, fam.key("block_count")))
    fingerprint = gguf_fingerprint(reader, in_file)
    arch, config = _synthetic_config(facts, block_count)
    if len(set(facts.n_experts.values())) != 1:
        raise GGUFFileError(f"{in_file}: layers have different expert counts {facts.n_experts}; stock llama.cpp files never do")
    validate_plan(plan, arch, config, fingerprint)
    keep = {layer_idx: sorted(plan.keep[layer_idx]) for layer_idx in facts.moe_layers}
    counts = {layer_idx: len(ids) for layer_idx, ids in keep.items()}
    if len(set(counts.values())) != 1:
        raise PlanError(
            f"{plan.where}: the plan keeps different expert counts per layer {counts}, but stock llama.cpp reads one "
            f"expert count per model; make a uniform plan (`packager plan create ... --uniform`)"
        )
    n_kept = next(iter(counts.values()))

    by_name = {tensor.name: tensor for tensor in reader.tensors}
    rows_of = _kept_rows(by_name, facts, keep, in_file)
    routers = [np.asarray(by_name[fam.router_name(i)].data, dtype=np.float32)[keep[i]] for i in facts.moe_layers]
    new_fingerprint = fingerprint_from_parts(facts.family, facts.moe_layers, [n_kept] * len(facts.moe_layers),
                                             facts.top_k, routers)
    plan_summary = {"sha256": plan.sha256(), "meta": plan.meta, "keep": {str(i): ids for i, ids in keep.items()}}
    source = json.loads(field_value(reader, KEY_SOURCE) or "{}")
    source["pruned_by"] = {"tool": "packager prune-gguf", "version": __version__, "input": in_file.name,
                           "plan_file": str(plan.source) if plan.source else None, **created_unix()}
    replaced = {
        fam.key("expert_count"): (n_kept, GGUFValueType.UINT32),
        KEY_FINGERPRINT: (new_fingerprint, GGUFValueType.STRING),
        KEY_PARENT_FINGERPRINT: (fingerprint, GGUFValueType.STRING),
        KEY_PLAN: (json.dumps(plan_summary, sort_keys=True), GGUFValueType.STRING),
        KEY_SOURCE: (json.dumps(source, sort_keys=True), GGUFValueType.STRING),
    }
    template = field_value(reader, "tokenizer.chat_template")
    if template and chat_template_for_plan(template, plan_summary) != template:
        # stock chat clients translate in the plan's first direction (runtime.prompt.with_default_direction)
        replaced["tokenizer.chat_template"] = (chat_template_for_plan(template, plan_summary), GGUFValueType.STRING)

    planned = []  # (tensor, what is written, its shape)
    for tensor in reader.tensors:
        rows = rows_of.get(tensor.name)
        data = tensor.data if rows is None else _Rows(tensor.data, rows)
        planned.append((tensor, data, tensor.data.shape if rows is None else (len(rows), *tensor.data.shape[1:])))

    def fill(writer) -> None:  # the parent's metadata with the replaced keys, then the tensor infos
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in replaced:
                continue
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
        for key, (value, vtype) in replaced.items():
            writer.add_key_value(key, value, vtype)
        for tensor, data, shape in planned:
            writer.add_tensor_info(tensor.name, shape, tensor.data.dtype, data.nbytes, raw_dtype=tensor.tensor_type)

    write_gguf(out_file, facts.gguf_arch, reader.endianess, fill, [data for _, data, _ in planned], progress,
               f"prune {out_file.name}")
    del planned
    file_type = field_value(reader, "general.file_type")
    del reader
    logger.info("gguf: pruned %s -> %s (%d -> %d experts per layer) in %.1fs", in_file.name, out_file.name,
                max(facts.n_experts.values()), n_kept, time.monotonic() - started)
    write_export_config(out_file, {"type": _file_type_name(file_type), "pruned_from": in_file.name})
    return out_file


def _file_type_name(file_type) -> str:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(file_type)).name.replace("MOSTLY_", "").replace("ALL_", "")
    except (TypeError, ValueError):
        return "unknown"
