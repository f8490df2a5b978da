"""The plan: which routed experts each MoE layer keeps (original numbering), for one model.

On disk (JSON):
    {"format": "edge-packager-plan", "version": 1,
     "model_fingerprint": "<sha256 of the parent, see packager.core.fingerprint>",
     "keep": {"<decoder layer index>": [sorted expert ids], ...},     # dense layers absent
     "meta": {"ranker": ..., "allocation": ..., "drop_ratio": ..., "languages": [...], ...}}

`validate_plan` checks a plan against a model before any file is touched."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.core.checkpoint import atomic_write_json
from packager.core.errors import PlanError

PLAN_FORMAT = "edge-packager-plan"
PLAN_VERSION = 1
_SHARED_HINT = "shared experts are never pruned: list routed expert ids only"


@dataclass
class Plan:
    model_fingerprint: str
    keep: dict[int, list[int]]
    meta: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        return str(self.source) if self.source else "plan"

    def counts(self) -> dict[int, int]:
        return {layer_idx: len(ids) for layer_idx, ids in self.keep.items()}

    def is_uniform(self) -> bool:
        return len(set(self.counts().values())) <= 1

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "keep": {str(layer_idx): sorted(ids) for layer_idx, ids in sorted(self.keep.items())},
            "meta": self.meta,
        }

    def sha256(self) -> str:
        """Hash of the canonical JSON (independent of formatting and key order)."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_json(path, self.to_json())
        self.source = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlanError(f"{path}: plan file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path}: plan is not valid JSON ({exc}); write it again with `packager plan`") from None
        return cls.from_json(data, source=path)

    @classmethod
    def from_json(cls, data: Any, source: Path | None = None) -> Plan:
        where = str(source) if source else "plan"
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a plan must be a JSON object")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"{where}: format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        if data.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise PlanError(f"{where}: plan version {data.get('version')!r} is not supported (this tool reads {PLAN_VERSION})")
        fingerprint = data.get("model_fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise PlanError(f"{where}: missing 'model_fingerprint' (the sha256 of the model the plan was made for)")
        raw_keep = data.get("keep")
        if not isinstance(raw_keep, dict) or not raw_keep:
            raise PlanError(f"{where}: missing 'keep' (an object: decoder layer index -> list of kept expert ids)")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanError(f"{where}: 'meta' must be an object")
        keep: dict[int, list[int]] = {}
        for key, ids in raw_keep.items():
            try:
                layer_idx = int(key)
            except (TypeError, ValueError):
                raise PlanError(f"{where}: 'keep' key {key!r} is not a decoder layer index") from None
            if not isinstance(ids, list):
                raise PlanError(f"{where}: layer {layer_idx}: kept experts must be a list of ids")
            for expert_idx in ids:
                if isinstance(expert_idx, str) and "shared" in expert_idx.lower():
                    raise PlanError(f"{where}: layer {layer_idx} names {expert_idx!r}; {_SHARED_HINT}")
                if not isinstance(expert_idx, int) or isinstance(expert_idx, bool):
                    raise PlanError(f"{where}: layer {layer_idx}: expert id {expert_idx!r} is not an integer")
            keep[layer_idx] = list(ids)
        return cls(model_fingerprint=fingerprint, keep=keep, meta=meta, source=source)


def _group_problem(arch, config, layer_idx: int, ids: list[int], n_experts: int) -> str | None:
    """Why a kept set breaks group-limited routing of MoE layer `layer_idx`, or None when it is valid."""
    routing = arch.routing_settings(config, layer_idx)
    n_group, topk_group, group_score_top, top_k = routing.n_group, routing.topk_group, routing.group_score_top, routing.top_k
    if n_group <= 1:
        return None
    group_size = n_experts // n_group
    per_group = [0] * n_group
    for expert_idx in ids:
        per_group[expert_idx // group_size] += 1
    if len(set(per_group)) != 1:
        return (f"layer {layer_idx} keeps {per_group} experts in its {n_group} routing groups; group-limited routing "
                "needs the same number kept in every group (experts are grouped in blocks of "
                f"{group_size}), or the groups would change")
    kept = per_group[0]
    if kept < group_score_top:
        return (f"layer {layer_idx} keeps {kept} expert(s) per group; group scores sum the top "
                f"{group_score_top}, so keep at least {group_score_top} per group")
    if kept * topk_group < top_k:
        return (f"layer {layer_idx} keeps {kept} per group x topk_group {topk_group} < top-k {top_k}: "
                "routing could not find top-k experts")
    return None


def validate_plan(plan: Plan, arch, config, fingerprint: str | None) -> None:
    """Raise PlanError unless `plan` fits this model exactly. Touches no file."""
    where = plan.where
    if fingerprint is not None and plan.model_fingerprint != fingerprint:
        raise PlanError(
            f"{where}: plan was made for model {plan.model_fingerprint[:16]}..., this model is {fingerprint[:16]}...; "
            "make a plan for this model"
        )
    if plan.meta.get("prune_shared") or plan.meta.get("drop_shared"):
        raise PlanError(f"{where}: meta asks to prune shared experts; {_SHARED_HINT}")
    n_layers = arch.n_layers(config)
    moe_layers = arch.moe_layers(config)
    for layer_idx in sorted(plan.keep):
        if not 0 <= layer_idx < n_layers:
            raise PlanError(f"{where}: layer {layer_idx} does not exist (the model has {n_layers} layers, 0..{n_layers - 1})")
        if layer_idx not in moe_layers:
            raise PlanError(f"{where}: layer {layer_idx} is a dense layer with no routed experts; remove it from the plan")
    missing = [layer_idx for layer_idx in moe_layers if layer_idx not in plan.keep]
    if missing:
        raise PlanError(f"{where}: no kept experts listed for MoE layer(s) {missing}; every MoE layer needs an entry")
    for layer_idx in moe_layers:
        ids = plan.keep[layer_idx]
        top_k = arch.top_k(config, layer_idx)
        n_experts = arch.n_experts(config, layer_idx)
        for expert_idx in ids:
            if not isinstance(expert_idx, int) or isinstance(expert_idx, bool):
                raise PlanError(f"{where}: layer {layer_idx}: expert id {expert_idx!r} is not an integer")
            if not 0 <= expert_idx < n_experts:
                shared = "; shared experts are not numbered and never pruned" if arch.tensors.get("shared") else ""
                raise PlanError(
                    f"{where}: layer {layer_idx}: expert {expert_idx} does not exist "
                    f"(the layer has {n_experts} routed experts, 0..{n_experts - 1}){shared}"
                )
        duplicates = sorted({e for e in ids if ids.count(e) > 1})
        if duplicates:
            raise PlanError(f"{where}: layer {layer_idx}: expert id(s) {duplicates} listed more than once")
        if len(ids) < top_k:
            raise PlanError(
                f"{where}: layer {layer_idx} keeps {len(ids)} expert(s), fewer than top-k={top_k}; keep at least {top_k}"
            )
        if arch.routing_kind == "sigmoid_group":
            problem = _group_problem(arch, config, layer_idx, ids, n_experts)
            if problem:
                raise PlanError(f"{where}: {problem}")


def plan_languages(plan: dict | None) -> list[str]:
    """The language codes in a plan's `meta.languages` (a plan dict, as exports embed it), in order,
    each once; entries that name no known language are skipped."""
    from runtime.errors import LanguageError
    from runtime.languages import parse_language

    codes = []
    for item in ((plan or {}).get("meta") or {}).get("languages") or []:
        try:
            code = parse_language(item).code
        except (LanguageError, TypeError):
            continue
        if code not in codes:
            codes.append(code)
    return codes
