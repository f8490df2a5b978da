"""Loading pruned checkpoints, including non-uniform ones (a different expert count per layer).

Stock transformers configs hold one expert count, so a non-uniform pruned config stores the
maximum there plus `expert_counts_per_layer`; plain `from_pretrained` then fails on the size
mismatch (it never random-initialises missing experts). `load_pruned` builds each MoE block
with its own count and lets transformers load the weights (with all its on-disk conversions:
per-expert keys, MXFP4 dequantisation, renames), and fails if any weight is missing.

A per-layer top-k (`top_k_per_layer`, packager.topk) is not read by stock transformers either:
`load_pruned` sets each layer's router to its own k after loading (`set_layer_top_k`)."""
from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from packager.core.arch import PER_LAYER_COUNTS_KEY, PER_LAYER_TOP_K_KEY, load_arch
from packager.core.errors import CheckpointError
from packager.core.quant_formats import DEQUANTIZED_HERE

logger = logging.getLogger(__name__)


def _resized_model_class(base_cls, arch, counts: list[int]):
    """A subclass of `base_cls` whose MoE blocks have the per-layer expert counts."""

    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        for layer_idx in arch.moe_layers(config):
            block_name = arch.moe_block_module(layer_idx)
            block = self.get_submodule(block_name)
            if counts[layer_idx] == arch.base_n_experts(config):
                continue
            layer_config = copy.deepcopy(config)
            for key in arch.n_experts_keys:
                setattr(layer_config, key, counts[layer_idx])
            parent_name, _, attr = block_name.rpartition(".")
            setattr(self.get_submodule(parent_name), attr, type(block)(layer_config))

    return type(base_cls.__name__, (base_cls,), {"__init__": __init__, "__module__": base_cls.__module__})


def set_layer_top_k(model, ks: dict[int, int]) -> dict[int, int]:
    """Route MoE layer i of a transformers model through ks[i] experts per token; returns the
    previous k of those layers. Every supported family's router module holds its k as `top_k`
    (Mixtral's block keeps an unused copy, set alike so the two never disagree)."""
    arch = load_arch(model.config)
    moe_layers = set(arch.moe_layers(model.config))
    previous = {}
    for layer_idx, k in ks.items():
        if layer_idx not in moe_layers:
            raise CheckpointError(f"layer {layer_idx} is not an MoE layer of this model ({sorted(moe_layers)})")
        router = model.get_submodule(arch.router_module(layer_idx))
        if not hasattr(router, "top_k"):
            raise CheckpointError(f"layer {layer_idx}: router {type(router).__name__} has no top_k to set")
        previous[layer_idx] = router.top_k
        for module in (router, model.get_submodule(arch.moe_block_module(layer_idx))):
            if hasattr(module, "top_k"):
                module.top_k = int(k)
    return previous


@contextmanager
def layer_top_k(model, ks: dict[int, int]):
    """`set_layer_top_k` while the block runs, restored afterwards (in-memory experiments)."""
    previous = set_layer_top_k(model, ks)
    try:
        yield model
    finally:
        set_layer_top_k(model, previous)


def apply_config_top_k(model):
    """Set each router's k from the config's per-layer top-k, when it has one; returns the model."""
    if getattr(model.config, PER_LAYER_TOP_K_KEY, None) is not None:
        arch = load_arch(model.config)
        set_layer_top_k(model, dict(zip(arch.moe_layers(model.config), arch.layer_top_ks(model.config))))
    return model


def load_pruned(path: str | os.PathLike, **kwargs):
    """Load a pruned (or any) checkpoint as a transformers causal LM; kwargs go to from_pretrained.

    Uniform checkpoints load with plain `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(path)
    if kwargs.get("trust_remote_code"):
        raise ValueError("load_pruned never runs remote code")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    quantization = getattr(config, "quantization_config", None) or {}
    if isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4" and "quantization_config" not in kwargs:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            from transformers import Mxfp4Config

            # without accelerate/kernels transformers can only run MXFP4 experts dequantised
            logger.info("%s: MXFP4 experts are dequantised on load", path)
            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if str(method).lower() in DEQUANTIZED_HERE and "quantization_config" not in kwargs:
        return _load_dequantized(path, **kwargs)
    counts = getattr(config, PER_LAYER_COUNTS_KEY, None)
    if counts is None:
        return apply_config_top_k(AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs))
    arch = load_arch(config)
    if len(counts) != arch.n_layers(config):
        raise CheckpointError(f"{path / 'config.json'}: {PER_LAYER_COUNTS_KEY} needs one entry per decoder layer")
    model_cls = _resized_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], arch, list(counts))
    model, info = model_cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "unexpected_keys") and v}
    if problems:
        raise CheckpointError(f"{path}: pruned checkpoint does not match its per-layer expert counts: {problems}")
    logger.info("loaded %s with per-layer expert counts %s", path, counts)
    return apply_config_top_k(model)


def _load_dequantized(path: Path, **kwargs):
    """An FP8 / GPTQ / AWQ / compressed-tensors checkpoint loaded without transformers'
    quantizers (they need accelerate and GPU kernels): the packager dequantises it exactly to a
    float32 copy in a temporary directory, transformers loads that, the copy is removed."""
    import shutil
    import tempfile

    from packager.core.checkpoint import CheckpointReader
    from packager.core.quant_formats import logical_shape, logical_tensors, write_dequantized

    with CheckpointReader(path) as reader:
        need = sum(4 * _numel(logical_shape(reader, name)) for name in logical_tensors(reader))
    tmp_root = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    if free < need + 64 * 1024**2:
        raise CheckpointError(f"{path}: loading this quantized checkpoint needs a {need / 1e9:.1f} GB float32 copy, "
                              f"{tmp_root} has {free / 1e9:.1f} GB free; set TMPDIR to a larger disk")
    with tempfile.TemporaryDirectory(prefix=".dequantized-", dir=tmp_root) as tmp:
        logger.info("%s: dequantised to float32 in %s for loading", path, tmp)
        plain = write_dequantized(path, Path(tmp) / path.name)
        return load_pruned(plain, **kwargs)


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
