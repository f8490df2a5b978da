"""The whole run: check the inputs, get the targets, split off a dev set, train, write."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from packager.core.errors import OutputExistsError
from packager.core.provenance import versions
from packager.distill import targets
from packager.distill.lineage import Lineage, check_lineage, file_sha
from packager.distill.settings import DistillError, DistillResult, DistillSettings
from packager.distill.targets import Sample
from packager.distill.trainer import Example, WorkDir, build_examples, train
from packager.distill.writer import write_output

logger = logging.getLogger(__name__)

# settings that do not change what is trained, so a resumed run may change them
_NOT_IN_TRAIN_KEY = ("max_steps", "minutes", "checkpoint_minutes", "device", "gen_batch_size")


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)


def default_work_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.distill-work"


def default_cache_dir(out_dir: Path) -> Path:
    return out_dir.parent / "distill-cache"


def distill(pruned_dir: str | os.PathLike, parent_dir: str | os.PathLike, data: Sequence[str | os.PathLike],
            settings: DistillSettings, out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
            work_dir: str | os.PathLike | None = None, force: bool = False, keep_work: bool = False,
            command: str | None = None, show_progress: bool = False,
            on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Fine-tune the pruned checkpoint on the parent's translations (or on references) and write
    the result to `out_dir` (see the package docstring)."""
    import torch
    import transformers

    from packager.core.pruned_model import load_pruned

    started = time.monotonic()
    settings.check()
    pruned_dir, parent_dir, out_dir = Path(pruned_dir), Path(parent_dir), Path(out_dir)
    data = [Path(p) for p in data]
    _check_paths(pruned_dir, parent_dir, data, out_dir, force)
    lineage = check_lineage(pruned_dir, parent_dir)
    samples = targets.read_sources(data, settings)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(out_dir)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out_dir)
    tokenizer, eos_id, pad_id = _tokenizer(pruned_dir)
    prompts, chat_sha = _prompts(pruned_dir, tokenizer, samples, settings)

    bar = _progress_bar(show_progress)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(settings.seed)
    record: dict = {"targets": settings.targets}
    with bar if bar is not None else contextlib.nullcontext():
        dropped = {"unfinished": 0, "empty": 0}
        if settings.targets == "parent":
            key = targets.cache_key(lineage.parent_fingerprint, data, settings, chat_sha)
            record["parent_outputs"] = _parent_targets(parent_dir, samples, settings, key, cache_dir, dropped, bar)
        else:
            for sample in samples:
                sample.target_ids = tokenizer(sample.reference, add_special_tokens=False)["input_ids"] + [eos_id]
        kept = [(s, p) for s, p in zip(samples, prompts) if s.target_ids is not None]
        examples, too_long = build_examples([s for s, _ in kept], [p for _, p in kept], eos_id, settings.max_tokens)
        dropped.update(too_long)
        if len(examples) < 2:
            raise DistillError(f"{', '.join(map(str, data))}: only {len(examples)} usable training example(s) after "
                               f"dropping {dropped}: give more sentences")
        dev_set, train_set = _dev_split(examples, settings)
        model = load_pruned(pruned_dir, dtype=getattr(torch, settings.dtype))
        model.to(settings.device)
        for param in model.parameters():
            param.requires_grad_(True)
        n_params = sum(p.numel() for p in model.parameters())
        examples_digest = hashlib.sha256(json.dumps([[e.ids, e.prompt_len] for e in examples]).encode()).hexdigest()
        train_key = {"pruned_fingerprint": lineage.pruned_fingerprint, "examples_sha256": examples_digest,
                     **{k: v for k, v in asdict(settings).items() if k not in _NOT_IN_TRAIN_KEY}}
        state = train(model, train_set, dev_set, train_set[:256], pad_id, settings, WorkDir(work, train_key), bar, on_step)

    sentences = {"requested_per_direction": settings.sentences, "sampled": len(samples), "dropped": dropped,
                 "train": len(train_set), "dev": len(dev_set)}
    provenance = _provenance(lineage, pruned_dir, parent_dir, data, settings, sentences, record, n_params, state, command)
    provenance["seconds"] = round(time.monotonic() - started, 2)
    write_output(model, pruned_dir, out_dir, provenance, force)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("distilled %s -> %s: %d steps, dev loss %.3f -> %.3f", pruned_dir, out_dir, state["step"],
                state["dev_loss_initial"], state["best_dev_loss"])
    return DistillResult(out_dir, provenance)


def _check_paths(pruned_dir: Path, parent_dir: Path, data: list[Path], out_dir: Path, force: bool) -> None:
    if not data:
        raise DistillError("--data: give at least one data file")
    if out_dir.exists() and not force:
        raise OutputExistsError(f"{out_dir}: output path exists; choose another path or pass --force")
    if not out_dir.parent.is_dir():
        raise DistillError(f"{out_dir}: directory {out_dir.parent} does not exist: create it first")
    if out_dir.absolute() in (pruned_dir.absolute(), parent_dir.absolute()):
        raise DistillError(f"{out_dir}: the output must not be an input directory")


def _tokenizer(pruned_dir: Path):
    """The pruned model's tokenizer, its end token and its padding token (the end token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(pruned_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise DistillError(f"{pruned_dir}: cannot load the tokenizer ({exc}): save it next to the model") from None
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DistillError(f"{pruned_dir}: the tokenizer has no end-of-sequence token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return tokenizer, eos_id, pad_id


def _prompts(pruned_dir: Path, tokenizer, samples: list[Sample], settings: DistillSettings) -> tuple[list[list[int]], str]:
    """The prompt token ids of every sample and the sha256 of the chat template that made them."""
    from packager.calibrate import CalibrationError, PromptBuilder

    try:
        builder = PromptBuilder(pruned_dir, tokenizer, settings.prompt_template)
        prompts = [builder.encode(s.pair, s.source)[0] for s in samples]
    except CalibrationError as exc:
        raise DistillError(str(exc)) from None
    return prompts, hashlib.sha256(builder.renderer.template_text.encode("utf-8")).hexdigest()


def _parent_targets(parent_dir: Path, samples: list[Sample], settings: DistillSettings, key: dict, cache_dir: Path,
                    dropped: dict, bar) -> dict:
    """Set each sample's targets to the parent's translation (from the cache or the parent), unless it
    is unfinished, empty or flagged (counted in `dropped`). Returns the record of where they came from."""
    cache_file = cache_dir / f"{targets.key_digest(key)[:32]}.jsonl"
    rows = targets.load_cached_outputs(cache_file, key, samples)
    record = {"cache_file": str(cache_file), "cache": "hit" if rows is not None else "miss"}
    if rows is None:
        gen_started = time.monotonic()
        task = bar.add_task("parent translates", total=len(samples)) if bar else None
        rows = targets.parent_outputs(parent_dir, samples, settings, (lambda n: bar.advance(task, n)) if bar else None)
        gen_seconds = time.monotonic() - gen_started
        targets.write_cached_outputs(cache_file, key, rows, gen_seconds)
        record["seconds"] = round(gen_seconds, 2)
    dropped["flagged"] = 0
    flags = targets.flagged_outputs(samples, rows) if settings.drop_flagged else [[] for _ in rows]
    for sample, row, kinds in zip(samples, rows, flags):
        if not row["finished"] and not settings.keep_unfinished:
            dropped["unfinished"] += 1
        elif not row["text"]:
            dropped["empty"] += 1
        elif kinds:
            dropped["flagged"] += 1
        else:
            sample.target_ids = list(row["ids"])
    return record


def _dev_split(examples: list[Example], settings: DistillSettings) -> tuple[list[Example], list[Example]]:
    """A seeded held-out share of the examples (the dev set) and the rest (the training set)."""
    order = list(range(len(examples)))
    random.Random(f"{settings.seed}:dev").shuffle(order)
    n_dev = max(1, min(settings.dev_max, round(len(examples) * settings.dev_fraction)))
    return [examples[i] for i in order[:n_dev]], [examples[i] for i in order[n_dev:]]


def _provenance(lineage: Lineage, pruned_dir: Path, parent_dir: Path, data: list[Path], settings: DistillSettings,
                sentences: dict, record: dict, n_params: int, state: dict, command: str | None) -> dict:
    return {
        "format": "edge-packager-distilled",
        "version": 1,
        "family": lineage.family,
        "parent": {"dir": str(parent_dir.absolute()), "fingerprint": lineage.parent_fingerprint},
        "input": {"dir": str(pruned_dir.absolute()), "fingerprint": lineage.pruned_fingerprint,
                  "keep": {str(k): v for k, v in sorted(lineage.keep.items())} or None,
                  "already_distilled": lineage.already_distilled},
        "data": [{"path": str(p), "sha256": file_sha(p)} for p in data],
        "targets": settings.targets,
        "trained": "all parameters (full fine-tune): embeddings, attention, norms, routers, kept experts, LM head",
        "loss": "cross-entropy on target tokens only; no load-balancing loss",
        "sentences": sentences,
        **record,
        "settings": asdict(settings),
        "parameters": n_params,
        "run": {k: state[k] for k in ("step", "epoch", "tokens", "elapsed", "best_step", "best_dev_loss", "dev_loss_initial",
                                      "probe_loss_initial", "probe_loss_final", "stopped", "resumed_from_step")},
        "history": state["history"],
        "command": command if command is not None else " ".join(sys.argv),
        "versions": versions("torch", "transformers", "safetensors"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
