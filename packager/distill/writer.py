"""Output: a normal pruned checkpoint (config.json, tokenizer, chat template and pruning.json copied
from the input, weights in the input's dtype and on-disk layout) plus `distillation.json` with the
provenance. It appears atomically."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from packager.core.checkpoint import safetensors_write_errors
from packager.core.errors import CheckpointError
from packager.distill.settings import PROVENANCE_NAME

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _input_dtype(pruned_dir: Path):
    import torch

    from packager.core.checkpoint import CheckpointReader

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    with CheckpointReader(pruned_dir) as reader:
        counts: dict[str, int] = {}
        for info in reader.infos():
            if info.dtype in names:
                counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    if not counts:
        raise CheckpointError(f"{pruned_dir}: no floating-point tensors")
    return names[max(counts, key=counts.get)]


def write_output(model, pruned_dir: Path, out_dir: Path, provenance: dict, force: bool) -> Path:
    """Weights through transformers' save (its on-disk layout), everything else from the input. A
    full disk, a read-only or unwritable folder is one OutputError naming `out_dir`."""
    import tempfile

    from runtime.atomic import OUTPUT_ERRNOS, OutputError, output_error

    dtype = _input_dtype(pruned_dir)
    model.to("cpu")
    model.to(dtype)
    try:
        with tempfile.TemporaryDirectory(prefix=".distill-save-", dir=out_dir.parent) as tmp:
            with safetensors_write_errors():
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
            _write_checkpoint(Path(tmp), pruned_dir, out_dir, dtype, provenance, force)
    except OSError as exc:
        if isinstance(exc, OutputError) or exc.errno not in OUTPUT_ERRNOS:
            raise
        raise output_error(out_dir, exc) from None
    return out_dir


def _write_checkpoint(saved_dir: Path, pruned_dir: Path, out_dir: Path, dtype, provenance: dict, force: bool) -> None:
    """`out_dir` from the tensors transformers saved in `saved_dir` and the input's other files."""
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CONFIG_NAME, INDEX_NAME, CheckpointReader, CheckpointWriter
    from packager.core.fingerprint import model_fingerprint
    from runtime.atomic import atomic_write_json

    with CheckpointReader(pruned_dir) as before:
        expected = {info.name: (info.dtype, info.shape) for info in before.infos()}
        config = before.config
    (saved_dir / CONFIG_NAME).write_text(json.dumps(config))  # the pruner's config, verbatim
    with CheckpointReader(saved_dir) as saved, CheckpointWriter(out_dir, force=force) as writer:
        got = {info.name: (info.dtype, info.shape) for info in saved.infos()}
        if got != expected:
            arch = load_arch(config)
            for layer_idx in arch.moe_layers(config):
                arch.detect_layout(layer_idx, arch.n_experts(config, layer_idx), set(got))
            logger.info("distill: transformers wrote another tensor layout than the input (%d vs %d tensors)",
                        len(got), len(expected))
        for info in saved.infos():
            writer.add_ranges(info.name, info.dtype, info.shape, [(info.path, info.offset, info.nbytes)])
        for path in sorted(pruned_dir.iterdir()):
            if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in (INDEX_NAME, PROVENANCE_NAME):
                shutil.copy2(path, writer.staging_dir / path.name)
        provenance["output"] = {"dtype": str(dtype).replace("torch.", ""), "tensors": len(got),
                                "same_layout_as_input": got == expected, "model_fingerprint": model_fingerprint(saved)}
        atomic_write_json(writer.staging_dir / PROVENANCE_NAME, provenance)
        writer.finalize()
