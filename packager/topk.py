"""Top-k reduction (issue 18 part 3): serve a checkpoint with fewer active experts per token.

`reduce_top_k(MODEL, OUT, k)` writes a copy of MODEL (a parent or a pruned checkpoint) whose
config routes every token through k experts instead of the model's top-k: weights are hard
links (copies across file systems) of the input shards, only config.json changes. Every
exporter reads top-k from the config (through packager.core.arch), so GGUF
(`{arch}.expert_used_count`) and ONNX (the TopK node / QMoE `k`) exports of OUT run at k, and
transformers loads OUT at k (packager.load_pruned): that is the reference the parity tests
compare the runtimes with.

k is one number for every MoE layer, or one per MoE layer in order (`--top-k 2,2,1,1`). A
per-layer k that differs between layers is written as `top_k_per_layer` (one entry per decoder
layer, 0 for dense layers, like `expert_counts_per_layer`) with the family's top-k key holding
the largest. Only ONNX serves it (each layer has its own TopK / QMoE node); stock llama.cpp reads
one `expert_used_count` per model, so the GGUF exporter refuses it. Stock transformers ignores
the key: load with packager.load_pruned, which sets each router's k.

Routing at the reduced k is the family's own routing with k in place of top-k: for routers
that renormalise the top-k weights (Qwen3-MoE with norm_topk_prob, Mixtral, GPT-OSS) the k
weights still sum to 1; for routers that do not (OLMoE, Qwen2-MoE) the single weight is the
softmax probability, as transformers computes it.

The model fingerprint covers top-k (per layer when it differs), so OUT has its own fingerprint;
`reduction.json` records the input's fingerprint and both k. pruning.json, when the input has
one, is copied with its `model_fingerprint` updated, so exports still name the original parent.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from packager.core.errors import OutputExistsError, PackagerError
from packager.core.provenance import created_unix

REDUCTION_NAME = "reduction.json"


class TopKError(PackagerError):
    """A top-k reduction that cannot be written."""


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def parse_top_k(text: str) -> int | list[int]:
    """`--top-k` text: one whole number, or comma-separated numbers (one per MoE layer)."""
    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isdigit() for part in parts):
        raise TopKError(f"--top-k {text!r}: give a whole number, or one whole number per MoE layer separated by "
                        "commas (e.g. 2,2,1,1)")
    values = [int(part) for part in parts]
    return values[0] if len(values) == 1 else values


def _target_ks(model_dir: Path, arch, config: dict, top_k) -> list[int]:
    """The k of each MoE layer that `top_k` (a number or one per MoE layer) asks for, checked."""
    layers = arch.moe_layers(config)
    current = arch.layer_top_ks(config)
    if isinstance(top_k, list):
        if len(top_k) != len(layers):
            raise TopKError(f"{model_dir}: --top-k {','.join(map(str, top_k))}: {len(top_k)} values for {len(layers)} "
                            f"MoE layers {layers}; give one k per MoE layer in order, or one number for all")
        for layer_idx, k, now in zip(layers, top_k, current):
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= now:
                raise TopKError(f"{model_dir}: --top-k {','.join(map(str, top_k))}: layer {layer_idx} needs a whole "
                                f"number from 1 to {now} (the layer routes each token through {now} experts), got {k!r}")
        if top_k == current:
            raise TopKError(f"{model_dir}: --top-k {','.join(map(str, top_k))} reduces no layer (the model's top-k per "
                            f"MoE layer is {','.join(map(str, current))}); lower k in at least one layer")
        return list(top_k)
    largest = arch.top_k(config)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k < largest or top_k > min(current):
        raise TopKError(f"{model_dir}: --top-k {top_k!r}: give a whole number from 1 to {min(largest - 1, min(current))} "
                        f"(the model routes each token through {largest} experts)")
    return [top_k] * len(layers)


def _read_config(model_dir: Path) -> dict:
    from packager.core.checkpoint import CONFIG_NAME

    config_path = model_dir / CONFIG_NAME
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TopKError(f"{config_path}: not found; MODEL must be a Hugging Face checkpoint directory") from None
    except json.JSONDecodeError as exc:
        raise TopKError(f"{config_path}: not valid JSON ({exc})") from None


def check_top_k(model_dir: str | os.PathLike, top_k: int | list[int]) -> list[int]:
    """The k per MoE layer that `top_k` asks of MODEL, or TopKError (nothing is written). Pruning
    keeps MoE layers and top-k, so a check on a parent holds for its pruned checkpoints."""
    from packager.core.arch import load_arch

    config = _read_config(Path(model_dir))
    return _target_ks(Path(model_dir), load_arch(config), config, top_k)


def reduce_top_k(model_dir: str | os.PathLike, out_dir: str | os.PathLike, top_k: int | list[int],
                 force: bool = False) -> Path:
    """Write OUT = MODEL served with `top_k` experts per token: one number, or one per MoE layer
    (module docstring)."""
    from packager.core.arch import PER_LAYER_TOP_K_KEY, load_arch
    from packager.core.checkpoint import CONFIG_NAME
    from packager.core.fingerprint import model_fingerprint
    from packager.prune import PROVENANCE_NAME
    from runtime.atomic import atomic_write_json, fsync_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = _read_config(model_dir)
    arch = load_arch(config)
    current = arch.fingerprint_top_k(config)
    ks = _target_ks(model_dir, arch, config, top_k)
    uniform = len(set(ks)) <= 1
    target = ks[0] if uniform else ks
    if out_dir.exists() and not force:
        raise OutputExistsError(f"{out_dir}: output path exists; choose another path or pass --force")
    if out_dir.absolute() == model_dir.absolute():
        raise OutputExistsError(f"{out_dir}: the output must not be the input model directory")
    input_fingerprint = model_fingerprint(model_dir)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for path in sorted(model_dir.iterdir()):
            if path.is_file() and path.name not in (CONFIG_NAME, REDUCTION_NAME, PROVENANCE_NAME):
                _link_or_copy(path, staging / path.name)
        new_config = {key: value for key, value in config.items() if key != PER_LAYER_TOP_K_KEY}
        new_config[arch.top_k_key] = max(ks)
        if not uniform:
            new_config[PER_LAYER_TOP_K_KEY] = arch.per_decoder_layer(config, dict(zip(arch.moe_layers(config), ks)))
        atomic_write_json(staging / CONFIG_NAME, new_config)
        fingerprint = model_fingerprint(staging)
        pruning_path = model_dir / PROVENANCE_NAME
        if pruning_path.is_file():
            pruning = json.loads(pruning_path.read_text(encoding="utf-8"))
            pruning["model_fingerprint"] = fingerprint
            pruning["top_k_reduction"] = {"from": current, "to": target}
            atomic_write_json(staging / PROVENANCE_NAME, pruning)
        keys = {"config_key": arch.top_k_key} | ({} if uniform else {"per_layer_key": PER_LAYER_TOP_K_KEY,
                                                                      "moe_layers": arch.moe_layers(config)})
        atomic_write_json(staging / REDUCTION_NAME, {
            "format": "edge-packager-topk", "version": 1, "family": arch.family,
            "top_k": {"from": current, "to": target, **keys},
            "input": {"dir": str(model_dir.absolute()), "fingerprint": input_fingerprint},
            "model_fingerprint": fingerprint, **created_unix(),
        })
        fsync_dir(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
