"""The MoE architecture description: one JSON data file per family, loaded once into a frozen
`MoEArch`. This module is the only code that expands tensor-name templates; every stage asks
an `MoEArch` for names, counts and routing instead of spelling them itself."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any

from packager.core.errors import CheckpointError, UnsupportedArchitecture

logger = logging.getLogger(__name__)

# Our own config key for non-uniform pruned checkpoints: one entry per decoder layer
# (0 for dense layers). Stock transformers does not read it, on purpose (see load_pruned).
PER_LAYER_COUNTS_KEY = "expert_counts_per_layer"
# Our own config key for a per-layer top-k (packager.topk): the same shape, k per decoder layer
# (0 for dense layers), with the family's top-k key holding the maximum. Stock transformers does
# not read it either: packager.core.pruned_model sets each router's k on load.
PER_LAYER_TOP_K_KEY = "top_k_per_layer"

ROUTING_KINDS = ("softmax_topk", "topk_softmax", "sigmoid_group")
_FAMILY_FIELDS = {
    "family", "model_types", "description", "config", "dense_layers", "routing",
    "tensors", "layouts", "modules", "packed_params_per_element",
}


def config_dict(config: Any) -> dict:
    """A plain dict view of a parsed config.json or a transformers PretrainedConfig."""
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"expected a config dict or PretrainedConfig, got {type(config).__name__}")
    return to_dict()


@dataclass(frozen=True)
class RoutingSettings:
    """One MoE layer's routing, resolved from the config once: routers run on every forward
    pass, and every consumer (reference routing, ONNX export, plan checks) reads the same
    defaults from here."""

    kind: str
    top_k: int
    renorm: bool
    scaling: float
    n_group: int
    topk_group: int
    group_score_top: int


def _expand(template: str, **values: int) -> str:
    return Template(template).substitute(**values)


@dataclass(frozen=True)
class MoEArch:
    """Declarative description of one MoE family (see packager/core/arch/*.json)."""

    family: str
    model_types: tuple[str, ...]
    description: str
    n_experts_keys: tuple[str, ...]      # read the first present, write all of them
    top_k_key: str
    top_k_default: int | None
    n_layers_key: str
    dense_layers: Mapping[str, str]      # rule name -> config key
    routing: Mapping[str, Any]
    tensors: Mapping[str, Any]
    layouts: Mapping[str, tuple[str, ...]]  # layout name -> expert roles it needs on disk
    modules: Mapping[str, str]
    packed_params_per_element: Mapping[str, float] = field(default_factory=dict)

    # ---------------------------------------------------------------- config
    def _get(self, config: Any, key: str, default: Any = None) -> Any:
        cfg = config_dict(config)
        return cfg.get(key, default) if cfg.get(key) is not None else default

    def n_layers(self, config: Any) -> int:
        value = self._get(config, self.n_layers_key)
        if not isinstance(value, int) or value < 1:
            raise CheckpointError(f"config has no valid {self.n_layers_key!r} ({value!r}) for family {self.family}")
        return value

    def base_n_experts(self, config: Any) -> int:
        """The expert count the config's count keys hold (the maximum for non-uniform configs)."""
        cfg = config_dict(config)
        for key in self.n_experts_keys:
            if cfg.get(key) is not None:
                return int(cfg[key])
        raise CheckpointError(f"config has none of the expert-count keys {list(self.n_experts_keys)} ({self.family})")

    def n_experts(self, config: Any, layer_idx: int | None = None) -> int:
        """Routed experts of one decoder layer (or the maximum over layers when layer_idx is None)."""
        counts = config_dict(config).get(PER_LAYER_COUNTS_KEY)
        if counts is None:
            return self.base_n_experts(config)
        if layer_idx is None:
            return max(counts)
        if not 0 <= layer_idx < len(counts):
            raise CheckpointError(f"{PER_LAYER_COUNTS_KEY} has no entry for layer {layer_idx}")
        return int(counts[layer_idx])

    def is_uniform(self, config: Any) -> bool:
        counts = config_dict(config).get(PER_LAYER_COUNTS_KEY)
        if counts is None:
            return True
        return len({counts[layer_idx] for layer_idx in self.moe_layers(config)}) <= 1

    def top_k(self, config: Any, layer_idx: int | None = None) -> int:
        """Experts per token of MoE layer `layer_idx` (the maximum over layers when None)."""
        value = self._get(config, self.top_k_key, self.top_k_default)
        if not isinstance(value, int) or value < 1:
            raise CheckpointError(f"config has no valid top-k {self.top_k_key!r} ({value!r}) for family {self.family}")
        if layer_idx is None or config_dict(config).get(PER_LAYER_TOP_K_KEY) is None:
            return value
        k = dict(zip(self.moe_layers(config), self.layer_top_ks(config))).get(layer_idx)
        if k is None:
            raise CheckpointError(f"layer {layer_idx} is not an MoE layer; it has no top-k")
        return k

    def layer_top_ks(self, config: Any) -> list[int]:
        """The top-k of each MoE layer, in `moe_layers` order (validated against the config)."""
        cfg = config_dict(config)
        base = self.top_k(cfg)
        layers = self.moe_layers(cfg)
        per_layer = cfg.get(PER_LAYER_TOP_K_KEY)
        if per_layer is None:
            return [base] * len(layers)
        if (not isinstance(per_layer, list) or len(per_layer) != self.n_layers(cfg)
                or not all(isinstance(k, int) and not isinstance(k, bool) for k in per_layer)):
            raise CheckpointError(f"config {PER_LAYER_TOP_K_KEY!r} must list one integer per decoder layer "
                                  f"({self.n_layers(cfg)}), got {per_layer!r}")
        ks = [per_layer[i] for i in layers]
        if any(not 1 <= k <= base for k in ks) or max(ks, default=base) != base:
            raise CheckpointError(f"config {PER_LAYER_TOP_K_KEY!r} {per_layer!r}: every MoE layer needs a k from 1 to "
                                  f"{self.top_k_key}={base}, and the largest must equal it")
        return ks

    def fingerprint_top_k(self, config: Any) -> int | list[int]:
        """Top-k as the model fingerprint hashes it: one number, or one per MoE layer when they differ."""
        ks = self.layer_top_ks(config)
        return ks if len(set(ks)) > 1 else self.top_k(config)

    def moe_layers(self, config: Any) -> list[int]:
        """Decoder-layer indices whose MLP is a routed-expert block (need not be contiguous)."""
        cfg = config_dict(config)
        n_layers = self.n_layers(cfg)
        if self.base_n_experts(cfg) <= 0:
            return []
        mlp_only = set(cfg.get(self.dense_layers["mlp_only_layers"], None) or []) if "mlp_only_layers" in self.dense_layers else set()
        step = 1
        if "sparse_step" in self.dense_layers:
            step = int(cfg.get(self.dense_layers["sparse_step"]) or 1)
        first_moe = 0
        if "first_dense" in self.dense_layers:
            first_moe = int(cfg.get(self.dense_layers["first_dense"]) or 0)
        return [
            layer_idx for layer_idx in range(n_layers)
            if layer_idx not in mlp_only and (layer_idx + 1) % step == 0 and layer_idx >= first_moe
        ]

    def routing_param(self, config: Any, name: str) -> Any:
        """A routing setting: a constant from the data file or a config key with a default."""
        spec = self.routing.get(name)
        if spec is None:
            return None
        if "value" in spec:
            return spec["value"]
        return self._get(config, spec["key"], spec.get("default"))

    def routing_settings(self, config: Any, layer_idx: int | None = None) -> RoutingSettings:
        """The routing of MoE layer `layer_idx` (its own top-k; the config's when None)."""
        n_group = int(self.routing_param(config, "n_group") or 1)
        return RoutingSettings(
            kind=self.routing_kind,
            top_k=self.top_k(config, layer_idx),
            renorm=bool(self.routing_param(config, "renorm")),
            scaling=float(self.routing_param(config, "scaling") or 1.0),
            n_group=n_group,
            topk_group=int(self.routing_param(config, "topk_group") or n_group),
            group_score_top=int(self.routing.get("group_score_top", 1)),
        )

    @property
    def routing_kind(self) -> str:
        return self.routing["kind"]

    # ---------------------------------------------------------------- tensors
    def router_weight_name(self, layer_idx: int) -> str:
        return _expand(self.tensors["router_weight"], layer_idx=layer_idx)

    def router_bias_name(self, layer_idx: int) -> str | None:
        template = self.tensors.get("router_bias")
        return _expand(template, layer_idx=layer_idx) if template else None

    def score_bias_name(self, layer_idx: int) -> str | None:
        template = self.tensors.get("score_bias")
        return _expand(template, layer_idx=layer_idx) if template else None

    def router_tensor_names(self, layer_idx: int) -> list[str]:
        """Tensors with one row (or element) per routed expert that belong to the router."""
        names = [self.router_weight_name(layer_idx)]
        names += [n for n in (self.router_bias_name(layer_idx), self.score_bias_name(layer_idx)) if n]
        return names

    def expert_tensor_names(self, layer_idx: int, expert_idx: int) -> dict[str, str]:
        """Per-expert on-disk keys, role -> name (empty when the family has only fused layouts)."""
        templates = self.tensors.get("per_expert", {})
        return {role: _expand(t, layer_idx=layer_idx, expert_idx=expert_idx) for role, t in templates.items()}

    def fused_expert_names(self, layer_idx: int) -> dict[str, str]:
        """Fused on-disk keys (expert dimension first), role -> name, for every fused layout."""
        templates = self.tensors.get("fused", {})
        return {role: _expand(t, layer_idx=layer_idx) for role, t in templates.items()}

    def shared_expert_names(self, layer_idx: int) -> list[str]:
        return [_expand(t, layer_idx=layer_idx) for t in self.tensors.get("shared", [])]

    def detect_layout(self, layer_idx: int, n_experts: int, present: Any) -> str:
        """Which expert layout a layer uses on disk, given the set of tensor names present.

        Raises CheckpointError naming what is missing when no layout is complete."""
        best_missing: list[str] | None = None
        for layout, roles in self.layouts.items():
            wanted = self.layout_tensor_names(layout, layer_idx, n_experts)
            missing = [name for name in wanted if name not in present]
            if not missing:
                return layout
            if best_missing is None or len(missing) < len(best_missing):
                best_missing = missing
        shown = ", ".join(repr(n) for n in (best_missing or [])[:4])
        more = f" and {len(best_missing) - 4} more" if best_missing and len(best_missing) > 4 else ""
        raise CheckpointError(
            f"layer {layer_idx} has no complete expert layout ({', '.join(self.layouts)}): missing {shown}{more}"
        )

    def layout_tensor_names(self, layout: str, layer_idx: int, n_experts: int) -> list[str]:
        roles = self.layouts[layout]
        if layout == "per_expert":
            return [
                self.expert_tensor_names(layer_idx, expert_idx)[role]
                for expert_idx in range(n_experts) for role in roles
            ]
        fused = self.fused_expert_names(layer_idx)
        return [fused[role] for role in roles]

    # ---------------------------------------------------------------- what follows an expert
    def expert_scope(self, layer_idx: int) -> str | None:
        """The on-disk prefix after which a name carries an expert index (per-expert keys), e.g.
        `model.layers.3.mlp.experts.`; None for families with fused experts only."""
        prefixes = {t.split("${expert_idx}", 1)[0] for t in self.tensors.get("per_expert", {}).values() if "${expert_idx}" in t}
        return _expand(prefixes.pop(), layer_idx=layer_idx) if prefixes else None

    def expert_part_name(self, layer_idx: int, expert_idx: int, role: str, suffix: str = "weight") -> str:
        """On-disk name of one tensor of an expert's linear `role`: its weight, or a companion
        that replaces the weight's last name part (`weight_scale_inv`, `qweight`, `scales`, ...)."""
        weight = self.expert_tensor_names(layer_idx, expert_idx)[role]
        return weight if suffix == "weight" else weight[: -len("weight")] + suffix

    def layer_expert_tensors(self, layer_idx: int, n_experts: int, names, suffixes=("weight",)) -> dict[str, tuple]:
        """Every on-disk tensor of MoE layer `layer_idx` that belongs to a routed expert or to
        the router, as name -> (kind, expert index or None, role, suffix), kind being
        "router", "expert" (per-expert keys) or "fused" (expert dimension first).

        `suffixes` are the name endings a linear layer may have in this checkpoint (its
        quantization's companions). A tensor that carries an expert index (or sits with the
        router or the fused experts) but that the family does not describe is refused with a
        CheckpointError naming it: it could not follow its expert through pruning."""
        claimed: dict[str, tuple] = {}
        for name in self.router_tensor_names(layer_idx):
            claimed[name] = ("router", None, name.rsplit(".", 1)[1], "")
        scope = self.expert_scope(layer_idx)
        parts: dict[str, tuple[str, str]] = {}
        if scope is not None:
            for role, template in self.tensors.get("per_expert", {}).items():
                if "${expert_idx}" not in template:
                    continue
                rest = template.split("${expert_idx}", 1)[1].lstrip(".")
                for suffix in suffixes:
                    if suffix == "weight" or rest.endswith(".weight"):
                        parts[rest if suffix == "weight" else rest[: -len("weight")] + suffix] = (role, suffix)
        fused = {name: role for role, name in self.fused_expert_names(layer_idx).items()}
        router_dirs = {name.rsplit(".", 1)[0] + "." for name in self.router_tensor_names(layer_idx)}
        fused_dirs = {name.rsplit(".", 1)[0] + "." for name in fused}
        for name in names:
            if name in claimed:
                continue
            if name in fused:
                claimed[name] = ("fused", None, fused[name], "")
                continue
            if scope is not None and name.startswith(scope):
                index, _, rest = name[len(scope):].partition(".")
                if index.isdigit():
                    if rest not in parts:
                        known = sorted({p.rsplit(".", 1)[1] for p in parts})
                        raise CheckpointError(
                            f"tensor {name!r} belongs to expert {index} of layer {layer_idx}, but the {self.family} "
                            f"description knows no such per-expert tensor (known name endings: {', '.join(known)}); "
                            "refusing it rather than copying it without its expert"
                        )
                    if int(index) >= n_experts:
                        raise CheckpointError(f"tensor {name!r}: expert {index} of layer {layer_idx}, but config.json "
                                              f"says {n_experts} experts")
                    claimed[name] = ("expert", int(index), *parts[rest])
                    continue
            if any(name.startswith(d) for d in router_dirs):
                raise CheckpointError(
                    f"tensor {name!r} sits with the router of layer {layer_idx}, but the {self.family} description "
                    "knows no such router tensor (quantized or extra router tensors are not supported); "
                    "refusing it rather than copying it unpruned"
                )
            if any(name.startswith(d) for d in fused_dirs) or (scope is not None and name.startswith(scope)):
                raise CheckpointError(
                    f"tensor {name!r} sits with the fused experts of layer {layer_idx}, but the {self.family} "
                    "description knows no such expert tensor; refusing it rather than copying it unpruned"
                )
        return {name: kind for name, kind in claimed.items() if name in names}

    # ---------------------------------------------------------------- modules
    def router_module(self, layer_idx: int) -> str:
        return _expand(self.modules["router"], layer_idx=layer_idx)

    def experts_module(self, layer_idx: int) -> str:
        return _expand(self.modules["experts"], layer_idx=layer_idx)

    def moe_block_module(self, layer_idx: int) -> str:
        return _expand(self.modules["moe_block"], layer_idx=layer_idx)

    # ---------------------------------------------------------------- routing
    def route(self, router_logits, config: Any, bias=None, allowed=None, settings: RoutingSettings | None = None):
        """Reference routing of this family: (topk_idx, topk_weight). `settings` are the layer's
        resolved routing (the config's, at its top-k, when None). See packager.core.arch.routing."""
        from packager.core.arch.routing import route

        return route(settings or self.routing_settings(config), router_logits, bias=bias, allowed=allowed)

    def per_decoder_layer(self, config: Any, values: Mapping[int, int]) -> list[int]:
        """The layout of our per-layer config keys (expert counts, top-k): one entry per decoder
        layer, `values[i]` for MoE layer i and 0 for dense layers."""
        per_layer = [0] * self.n_layers(config)
        for layer_idx, value in values.items():
            per_layer[layer_idx] = value
        return per_layer

    def config_updates_for_counts(self, config: Any, counts: dict[int, int]) -> dict:
        """Config keys to write for a pruned model with `counts` experts per MoE layer."""
        cfg = config_dict(config)
        n_max = max(counts.values())
        updates: dict[str, Any] = {key: n_max for key in self.n_experts_keys}
        if len(set(counts.values())) > 1:
            updates[PER_LAYER_COUNTS_KEY] = self.per_decoder_layer(cfg, counts)
        else:
            updates[PER_LAYER_COUNTS_KEY] = None  # None = remove the key
        return updates


def _require(data: dict, key: str, source: str) -> Any:
    if key not in data:
        raise ValueError(f"architecture file {source}: missing {key!r}")
    return data[key]


def _parse(data: dict, source: str) -> MoEArch:
    unknown = set(data) - _FAMILY_FIELDS
    if unknown:
        raise ValueError(f"architecture file {source}: unknown fields {sorted(unknown)}")
    cfg = _require(data, "config", source)
    routing = _require(data, "routing", source)
    if routing.get("kind") not in ROUTING_KINDS:
        raise ValueError(f"architecture file {source}: routing.kind must be one of {ROUTING_KINDS}")
    tensors = _require(data, "tensors", source)
    layouts = {name: tuple(roles) for name, roles in _require(data, "layouts", source).items()}
    for name, roles in layouts.items():
        table = tensors.get("per_expert" if name == "per_expert" else "fused", {})
        for role in roles:
            if role not in table:
                raise ValueError(f"architecture file {source}: layout {name!r} role {role!r} has no template")
    prefixes = {t.split("${expert_idx}", 1)[0] for t in tensors.get("per_expert", {}).values() if "${expert_idx}" in t}
    if len(prefixes) > 1:
        raise ValueError(f"architecture file {source}: per-expert templates must share one prefix before ${{expert_idx}}")
    modules = _require(data, "modules", source)
    for key in ("router", "experts", "moe_block"):
        _require(modules, key, source)
    return MoEArch(
        family=_require(data, "family", source),
        model_types=tuple(_require(data, "model_types", source)),
        description=data.get("description", ""),
        n_experts_keys=tuple(_require(cfg, "n_experts_keys", source)),
        top_k_key=_require(cfg, "top_k_key", source),
        top_k_default=cfg.get("top_k_default"),
        n_layers_key=cfg.get("n_layers_key", "num_hidden_layers"),
        dense_layers=dict(data.get("dense_layers", {})),
        routing=dict(routing),
        tensors=dict(tensors),
        layouts=layouts,
        modules=dict(modules),
        packed_params_per_element=dict(data.get("packed_params_per_element", {})),
    )


@lru_cache(maxsize=1)
def _registry() -> dict[str, MoEArch]:
    by_model_type: dict[str, MoEArch] = {}
    for entry in sorted(resources.files("packager.core.arch").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        arch = _parse(json.loads(entry.read_text(encoding="utf-8")), entry.name)
        for model_type in arch.model_types:
            if model_type in by_model_type:
                raise ValueError(f"model_type {model_type!r} is declared by two architecture files")
            by_model_type[model_type] = arch
    return by_model_type


def supported_families() -> list[str]:
    return sorted({arch.family for arch in _registry().values()})


def load_arch(config: Any) -> MoEArch:
    """The architecture description for a parsed config.json (or PretrainedConfig)."""
    model_type = config_dict(config).get("model_type")
    arch = _registry().get(model_type)
    if arch is None:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not a supported MoE family; supported: {', '.join(supported_families())}"
        )
    return arch
