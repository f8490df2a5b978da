"""What a checkpoint is made of: family, layers, experts, top-k, and the parameter and byte
split between routed experts, shared experts, routers and the rest (read from headers only,
plus the router weights for the fingerprint)."""
from __future__ import annotations

import logging
import os

from packager.core.arch import PER_LAYER_COUNTS_KEY, load_arch
from packager.core.checkpoint import DTYPE_BYTES, CheckpointReader
from packager.core.fingerprint import model_fingerprint
from packager.prune import read_provenance

logger = logging.getLogger(__name__)

PARTS = ("routed_experts", "shared_experts", "routers", "other")


def summarize_checkpoint(model_dir: str | os.PathLike) -> dict:
    with CheckpointReader(model_dir) as reader:
        config = reader.config
        arch = load_arch(config)
        moe_layers = arch.moe_layers(config)
        names = set(reader.names())
        part_of: dict[str, str] = {}
        role_of: dict[str, str] = {}
        layouts: dict[int, str] = {}
        for layer_idx in moe_layers:
            n_experts = arch.n_experts(config, layer_idx)
            layout = layouts[layer_idx] = arch.detect_layout(layer_idx, n_experts, names)
            if layout == "per_expert":
                for expert_idx in range(n_experts):
                    for role, name in arch.expert_tensor_names(layer_idx, expert_idx).items():
                        part_of[name], role_of[name] = "routed_experts", role
            else:
                for role, name in arch.fused_expert_names(layer_idx).items():
                    part_of[name], role_of[name] = "routed_experts", role
            for name in arch.router_tensor_names(layer_idx):
                part_of[name] = "routers"
            for name in arch.shared_expert_names(layer_idx):
                part_of[name] = "shared_experts"
        split = {part: {"params": 0, "bytes": 0} for part in PARTS}
        for info in reader.infos():
            part = part_of.get(info.name, "other")
            numel = info.nbytes // DTYPE_BYTES[info.dtype]
            per_element = arch.packed_params_per_element.get(role_of.get(info.name, ""), 1)
            split[part]["params"] += int(numel * per_element)
            split[part]["bytes"] += info.nbytes
        total_params = sum(v["params"] for v in split.values())
        total_bytes = sum(v["bytes"] for v in split.values())
        for values in split.values():
            values["params_share"] = values["params"] / total_params if total_params else 0.0
            values["bytes_share"] = values["bytes"] / total_bytes if total_bytes else 0.0
        n_layers = arch.n_layers(config)
        provenance = read_provenance(model_dir)
        return {
            "model_dir": str(reader.model_dir),
            "family": arch.family,
            "model_type": config.get("model_type"),
            "n_layers": n_layers,
            "moe_layers": moe_layers,
            "dense_layers": [i for i in range(n_layers) if i not in moe_layers],
            "experts_per_layer": {layer_idx: arch.n_experts(config, layer_idx) for layer_idx in moe_layers},
            "uniform": arch.is_uniform(config),
            "per_layer_counts_key": PER_LAYER_COUNTS_KEY in config,
            "top_k": arch.top_k(config),
            "top_k_per_layer": arch.layer_top_ks(config),  # MoE layers in order (packager.topk)
            "routing": arch.routing_kind,
            "renormalised": arch.routing_settings(config).renorm,
            "router_bias": bool(moe_layers and arch.router_bias_name(moe_layers[0]) in names),
            "score_correction_bias": bool(moe_layers and arch.score_bias_name(moe_layers[0]) in names),
            "shared_experts": bool(moe_layers and any(n in names for n in arch.shared_expert_names(moe_layers[0]))),
            "expert_layouts": sorted(set(layouts.values())),
            "split": split,
            "total_params": total_params,
            "total_bytes": total_bytes,
            "shards": len(reader.shard_paths),
            "fingerprint": model_fingerprint(reader),
            "pruned_from": provenance.get("parent_fingerprint") if provenance else None,
        }
