"""Lineage: the pruned checkpoint must come from the parent.

Family, layer structure, hidden size, vocabulary and top-k must match, the tokenizer files must be
identical, and every router row of the pruned model must equal a parent router row bit for bit (that
recovers the kept experts of each layer). A checkpoint that was already distilled has trained
routers; it is accepted when its `pruning.json` names this parent's fingerprint."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packager.distill.settings import PROVENANCE_NAME, DistillError

# tokenizer files that must be byte-identical between parent and pruned model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class Lineage:
    family: str
    parent_fingerprint: str
    pruned_fingerprint: str
    keep: dict[int, list[int]]     # recovered from router rows; {} for an already distilled input
    already_distilled: bool


def file_sha(path: Path) -> str | None:
    from runtime.file_hash import file_sha256

    return file_sha256(path) if path.is_file() else None


def check_lineage(pruned_dir: Path, parent_dir: Path) -> Lineage:
    """Raise DistillError unless `pruned_dir` is an expert-pruned copy of `parent_dir`."""
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader
    from packager.core.fingerprint import model_fingerprint
    from packager.prune import read_provenance

    for path, what in ((pruned_dir, "pruned model"), (parent_dir, "parent model")):
        if not (path / "config.json").is_file():
            raise DistillError(f"{path}: no config.json; the {what} must be a Hugging Face save_pretrained directory")
    with CheckpointReader(parent_dir) as parent, CheckpointReader(pruned_dir) as pruned:
        parent_arch, pruned_arch = load_arch(parent.config), load_arch(pruned.config)
        if parent_arch.family != pruned_arch.family:
            raise DistillError(f"{pruned_dir}: family {pruned_arch.family} but the parent {parent_dir} is {parent_arch.family}: "
                               "give the parent the model was pruned from")
        arch = parent_arch
        _check_shapes(arch, parent, pruned, pruned_dir, parent_dir)
        parent_fp = model_fingerprint(parent)
        pruned_fp = model_fingerprint(pruned)
        pruning = read_provenance(pruned_dir) or {}
        recorded = pruning.get("parent_fingerprint")
        if recorded is not None and recorded != parent_fp:
            raise DistillError(f"{pruned_dir / 'pruning.json'}: pruned from model {recorded[:16]}..., but {parent_dir} is "
                               f"{parent_fp[:16]}...: give the parent the model was pruned from")
        if (pruned_dir / PROVENANCE_NAME).is_file():
            if recorded is None:
                raise DistillError(f"{pruned_dir}: a distilled checkpoint without pruning.json; its parent cannot be checked")
            return Lineage(arch.family, parent_fp, pruned_fp, {}, True)
        keep = _kept_experts(arch, parent, pruned, pruned_dir, parent_dir)
        recorded_keep = pruning.get("keep")
        if recorded_keep is not None and {int(k): v for k, v in recorded_keep.items()} != keep:
            raise DistillError(f"{pruned_dir / 'pruning.json'}: lists kept experts that differ from the router rows; "
                               "the checkpoint was modified after pruning")
    return Lineage(arch.family, parent_fp, pruned_fp, keep, False)


def _check_shapes(arch, parent, pruned, pruned_dir: Path, parent_dir: Path) -> None:
    """Same layer structure, sizes and tokenizer files; an unpruned parent."""
    facts = {
        "moe layers": (arch.moe_layers(parent.config), arch.moe_layers(pruned.config)),
        "top-k": (arch.fingerprint_top_k(parent.config), arch.fingerprint_top_k(pruned.config)),
        "hidden_size": (parent.config.get("hidden_size"), pruned.config.get("hidden_size")),
        "vocab_size": (parent.config.get("vocab_size"), pruned.config.get("vocab_size")),
        "layers": (arch.n_layers(parent.config), arch.n_layers(pruned.config)),
    }
    for what, (a, b) in facts.items():
        if a != b:
            raise DistillError(f"{pruned_dir}: {what} {b} differs from the parent's ({a}, {parent_dir}): "
                               "the pruned model does not come from this parent")
    if not arch.is_uniform(parent.config):
        raise DistillError(f"{parent_dir}: expert counts differ between layers (a pruned model): give the unpruned parent")
    for name in TOKENIZER_FILES:
        a, b = file_sha(parent_dir / name), file_sha(pruned_dir / name)
        if a != b:
            raise DistillError(f"{pruned_dir / name}: differs from the parent's {name}: parent outputs are token ids "
                               "of the parent tokenizer, so both models need the same tokenizer files")


def _kept_experts(arch, parent, pruned, pruned_dir: Path, parent_dir: Path) -> dict[int, list[int]]:
    """The parent expert behind each router row of the pruned model, per MoE layer."""
    import numpy as np

    from packager.core.fingerprint import bytes_to_float32

    def rows(reader, layer_idx):
        info = reader.info(arch.router_weight_name(layer_idx))
        return bytes_to_float32(reader.read_bytes(info.name), info.dtype, info.shape)

    keep: dict[int, list[int]] = {}
    for layer_idx in arch.moe_layers(parent.config):
        parent_rows = {row.tobytes(): expert_idx for expert_idx, row in enumerate(np.ascontiguousarray(rows(parent, layer_idx)))}
        found = []
        for new_idx, row in enumerate(np.ascontiguousarray(rows(pruned, layer_idx))):
            expert_idx = parent_rows.get(row.tobytes())
            if expert_idx is None:
                raise DistillError(
                    f"{pruned_dir}: layer {layer_idx} router row {new_idx} equals no router row of the parent {parent_dir}: "
                    "the pruned model does not come from this parent (prune the parent with `packager prune`)")
            found.append(expert_idx)
        if found != sorted(set(found)):
            raise DistillError(f"{pruned_dir}: layer {layer_idx} router rows are not distinct parent experts in "
                               f"ascending order ({found}): not a `packager prune` output")
        keep[layer_idx] = found
    return keep
