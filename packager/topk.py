"""Top-k reduction (issue 18 part 3): serve a checkpoint with fewer active experts per token.

`reduce_top_k(MODEL, OUT, k)` writes a copy of MODEL (a parent or a pruned checkpoint) whose
config routes every token through k experts instead of the model's top-k: weights are hard
links (copies across file systems) of the input shards, only config.json changes. Every
exporter reads top-k from the config, so GGUF (`{arch}.expert_used_count`) and ONNX (the TopK
node / QMoE `k`) exports of OUT run at k, and transformers loads OUT at k: that is the
reference the parity tests compare the runtimes with.

Routing at the reduced k is the family's own routing with k in place of top-k: for routers
that renormalise the top-k weights (Qwen3-MoE with norm_topk_prob, Mixtral, GPT-OSS) the k
weights still sum to 1; for routers that do not (OLMoE, Qwen2-MoE) the single weight is the
softmax probability, as transformers computes it.

Uniform only: stock llama.cpp reads one expert_used_count per model, and the exporters take
one top-k per model, so a per-layer k is not offered.

The model fingerprint covers top-k, so OUT has its own fingerprint; `reduction.json` records
the input's fingerprint and both k. pruning.json, when the input has one, is copied with its
`model_fingerprint` updated, so exports still name the original parent.
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


def reduce_top_k(model_dir: str | os.PathLike, out_dir: str | os.PathLike, top_k: int, force: bool = False) -> Path:
    """Write OUT = MODEL served with `top_k` experts per token (module docstring)."""
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CONFIG_NAME
    from packager.core.fingerprint import model_fingerprint
    from packager.prune import PROVENANCE_NAME
    from runtime.atomic import atomic_write_json, fsync_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config_path = model_dir / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TopKError(f"{config_path}: not found; MODEL must be a Hugging Face checkpoint directory") from None
    except json.JSONDecodeError as exc:
        raise TopKError(f"{config_path}: not valid JSON ({exc})") from None
    arch = load_arch(config)
    current = arch.top_k(config)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k < current:
        raise TopKError(f"{model_dir}: --top-k {top_k!r}: give a whole number from 1 to {current - 1} "
                        f"(the model routes each token through {current} experts)")
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
        new_config = dict(config)
        new_config[arch.top_k_key] = top_k
        atomic_write_json(staging / CONFIG_NAME, new_config)
        fingerprint = model_fingerprint(staging)
        pruning_path = model_dir / PROVENANCE_NAME
        if pruning_path.is_file():
            pruning = json.loads(pruning_path.read_text(encoding="utf-8"))
            pruning["model_fingerprint"] = fingerprint
            pruning["top_k_reduction"] = {"from": current, "to": top_k}
            atomic_write_json(staging / PROVENANCE_NAME, pruning)
        atomic_write_json(staging / REDUCTION_NAME, {
            "format": "edge-packager-topk", "version": 1, "family": arch.family,
            "top_k": {"from": current, "to": top_k, "config_key": arch.top_k_key},
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
