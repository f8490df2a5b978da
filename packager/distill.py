"""Recovery by sequence-level distillation (step 4 of the pipeline).

1. Lineage: the pruned checkpoint must come from the parent. Family, layer structure,
   hidden size, vocabulary and top-k must match, the tokenizer files must be identical, and
   every router row of the pruned model must equal a parent router row bit for bit (that
   recovers the kept experts of each layer). A checkpoint that was already distilled has
   trained routers; it is accepted when its `pruning.json` names this parent's fingerprint.
2. Targets: with `targets="parent"` the parent translates the sampled source sentences
   (greedy or beam search, batched) and the pruned model learns the parent's token ids;
   outputs that hit the length bound without an end token (usually loops), or are empty,
   are dropped and counted (`keep_unfinished` keeps the cut ones), and so are outputs that the
   reference-free generation-error detectors of `packager.quality` flag (loops, wrong script or
   language, length outliers, lost placeholders; `drop_flagged=False` keeps them): a weak
   parent's mistakes are not worth teaching. The parent's outputs are
   cached on disk under a key made of the parent fingerprint, the data files' sha256, the
   pairs, the sentence count, the sampling seed and the decoding settings, so re-runs reuse
   them without loading the parent.
   `targets="references"` is the control: supervised fine-tuning on the reference translations.
3. Training: full fine-tune of the pruned model. Every parameter is trained (embeddings,
   attention, norms, routers, kept experts, LM head); nothing is frozen and no load-balancing
   loss is added. Loss = token-level cross-entropy on the target tokens only (prompt and
   padding masked), AdamW, linear warmup then cosine decay over the step or time budget.
   A seeded held-out slice of the sentences is the dev set; training stops at the step or
   time budget, or when the dev loss has not improved for `patience` evaluations, and the
   weights with the best dev loss are written.
4. Resume: the state (weights, AdamW moments, best weights, counters) is saved as safetensors
   plus JSON in a work directory at intervals and on interruption; a re-run with the same
   inputs continues from it. No pickle anywhere.
5. Output: a normal pruned checkpoint (config.json, tokenizer, chat template and pruning.json
   copied from the input, weights in the input's dtype and on-disk layout) plus
   `distillation.json` with the provenance. It appears atomically.

On the embedded default (15M parameters) on 2 CPU cores: a few thousand parent translations
take a minute or two. With 3 minutes of training (docs/results.md, en->de,fr,es), distillation
recovered -8% of the chrF++ lost at 50% dropped (38.3 -> 38.1; generation errors 6% -> 3%),
56% at 75% and 63% at 87.5%. For a 20-30B parent (Qwen3-30B-A3B, GPT-OSS-20B) on one GPU a user would
set: `--device cuda --dtype bfloat16` (float32 does not fit), `--sentences` so that about
10k sentences are translated in total (the paper's figure), `--gen-batch-size 64` or more,
`--lr 1e-5` (a full fine-tune of a large model wants a far smaller rate than our 3e-4),
`--batch-tokens 32768`, `--eval-every 200`, `--minutes 60`-`120`. Memory: AdamW keeps two
moments per parameter, so bf16 weights + gradients + moments take about 8 bytes per
parameter: one 80 GB GPU holds a pruned model of up to roughly 8B parameters (GPT-OSS-20B at
75% dropped is 6.6B); larger ones need an 8-bit optimizer, gradient checkpointing or
sharding, which this command does not provide. The GPU path is written but has not been run
here (no GPU on the build machines).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from packager.core.errors import CheckpointError, OutputExistsError, PackagerError
from packager.core.provenance import versions

logger = logging.getLogger(__name__)

PROVENANCE_NAME = "distillation.json"
TARGETS = ("parent", "references")
STATE_NAME = "state.json"
WEIGHTS_NAME = "model.safetensors"
BEST_NAME = "best.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
CACHE_FORMAT = "edge-packager-parent-outputs/1"
# tokenizer files that must be byte-identical between parent and pruned model
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = ("float32", "bfloat16", "float16")


class DistillError(PackagerError):
    """Distillation inputs (models, data, settings) that cannot be used."""


@dataclass(frozen=True)
class DistillSettings:
    pairs: tuple[str, ...]                 # direction slugs, e.g. ("en-de", "en-fr")
    targets: str = "parent"                # "parent" (distillation) | "references" (SFT control)
    sentences: int = 2000                  # source sentences per direction (before the dev split)
    max_steps: int | None = None           # optimizer steps (total, across resumes)
    minutes: float | None = None           # training wall time (total, across resumes)
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    batch_tokens: int = 4096               # padded tokens per batch
    max_tokens: int = 256                  # longer examples (prompt + target) are dropped
    dev_fraction: float = 0.05
    dev_max: int = 400
    eval_every: int = 100                  # steps between dev-loss evaluations
    patience: int = 3                      # evaluations without improvement before stopping
    seed: int = 0
    max_new_tokens: int = 128              # parent decoding bound
    keep_unfinished: bool = False          # train on parent outputs cut by the bound (default: drop them)
    drop_flagged: bool = True              # drop parent outputs the generation-error detectors flag
    num_beams: int = 1
    gen_batch_size: int = 32
    prompt_template: str = "{source}"
    text_lang: str | None = None
    checkpoint_minutes: float = 5.0
    device: str = "cpu"
    dtype: str = "float32"                 # weights of the parent and of the trained model

    def check(self) -> None:
        if not self.pairs:
            raise DistillError("--pairs: give at least one direction, e.g. en-de")
        if self.targets not in TARGETS:
            raise DistillError(f"--targets {self.targets!r}: use one of {', '.join(TARGETS)}")
        if self.sentences < 2:
            raise DistillError(f"--sentences {self.sentences}: need at least 2 (some are held out as the dev set)")
        if self.max_steps is None and self.minutes is None:
            raise DistillError("bound the training: give --max-steps N or --minutes M")
        if self.max_steps is not None and self.max_steps < 1:
            raise DistillError(f"--max-steps {self.max_steps}: must be at least 1")
        if self.minutes is not None and not self.minutes > 0:
            raise DistillError(f"--minutes {self.minutes}: must be positive")
        if not self.lr > 0:
            raise DistillError(f"--lr {self.lr}: must be positive")
        for name in ("batch_tokens", "max_tokens", "eval_every", "patience", "max_new_tokens", "num_beams", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise DistillError(f"{name.replace('_', '-')} must be at least 1")
        if self.dtype not in _DTYPES:
            raise DistillError(f"--dtype {self.dtype!r}: use one of {', '.join(_DTYPES)}")
        if not 0 < self.dev_fraction < 1:
            raise DistillError(f"dev fraction {self.dev_fraction}: must be in (0, 1)")


@dataclass
class DistillResult:
    out_dir: Path
    provenance: dict = field(default_factory=dict)


# ---- lineage -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lineage:
    family: str
    parent_fingerprint: str
    pruned_fingerprint: str
    keep: dict[int, list[int]]     # recovered from router rows; {} for an already distilled input
    already_distilled: bool


def _file_sha(path: Path) -> str | None:
    from packager.core.fingerprint import file_sha256

    return file_sha256(path) if path.is_file() else None


def check_lineage(pruned_dir: Path, parent_dir: Path) -> Lineage:
    """Raise DistillError unless `pruned_dir` is an expert-pruned copy of `parent_dir`."""
    import numpy as np

    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader
    from packager.core.fingerprint import bytes_to_float32, model_fingerprint
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
        facts = {
            "moe layers": (arch.moe_layers(parent.config), arch.moe_layers(pruned.config)),
            "top-k": (arch.top_k(parent.config), arch.top_k(pruned.config)),
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
        for name in _TOKENIZER_FILES:
            a, b = _file_sha(parent_dir / name), _file_sha(pruned_dir / name)
            if a != b:
                raise DistillError(f"{pruned_dir / name}: differs from the parent's {name}: parent outputs are token ids "
                                   "of the parent tokenizer, so both models need the same tokenizer files")
        parent_fp = model_fingerprint(parent)
        pruned_fp = model_fingerprint(pruned)
        pruning = read_provenance(pruned_dir) or {}
        recorded = pruning.get("parent_fingerprint")
        if recorded is not None and recorded != parent_fp:
            raise DistillError(f"{pruned_dir / 'pruning.json'}: pruned from model {recorded[:16]}..., but {parent_dir} is "
                               f"{parent_fp[:16]}...: give the parent the model was pruned from")
        distilled = (pruned_dir / PROVENANCE_NAME).is_file()
        if distilled:
            if recorded is None:
                raise DistillError(f"{pruned_dir}: a distilled checkpoint without pruning.json; its parent cannot be checked")
            return Lineage(arch.family, parent_fp, pruned_fp, {}, True)

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
        recorded_keep = pruning.get("keep")
        if recorded_keep is not None and {int(k): v for k, v in recorded_keep.items()} != keep:
            raise DistillError(f"{pruned_dir / 'pruning.json'}: lists kept experts that differ from the router rows; "
                               "the checkpoint was modified after pruning")
    return Lineage(arch.family, parent_fp, pruned_fp, keep, False)


# ---- data and parent outputs ---------------------------------------------------------------------
@dataclass
class Sample:
    pair: str
    source: str
    reference: str | None
    target_ids: list[int] | None = None   # filled from the parent or the reference


def read_sources(data: Sequence[Path], settings: DistillSettings) -> list[Sample]:
    """Seeded sample of at most `settings.sentences` per direction (calibration's reader)."""
    from packager.calibrate import CalibrationError, CalibrationSettings, read_examples

    calib = CalibrationSettings(pairs=settings.pairs, teacher_forced=settings.targets == "references",
                                max_sentences=settings.sentences, seed=settings.seed, text_lang=settings.text_lang)
    try:
        examples = read_examples([Path(p) for p in data], calib)
    except CalibrationError as exc:
        raise DistillError(str(exc)) from None
    samples = [Sample(ex.pair, ex.source, ex.target) for slug in settings.pairs for ex in examples[slug]]
    samples = [s for s in samples if s.source.strip()]
    if not samples:
        raise DistillError(f"{', '.join(map(str, data))}: no usable source sentences (empty data)")
    return samples


def cache_key(parent_fingerprint: str, data: Sequence[Path], settings: DistillSettings, chat_template_sha: str | None) -> dict:
    from packager.core.fingerprint import file_sha256

    return {
        "format": CACHE_FORMAT,
        "parent_fingerprint": parent_fingerprint,
        "data_sha256": [file_sha256(p) for p in data],
        "pairs": list(settings.pairs),
        "sentences": settings.sentences,
        "seed": settings.seed,
        "max_new_tokens": settings.max_new_tokens,
        "num_beams": settings.num_beams,
        "dtype": settings.dtype,
        "prompt_template": settings.prompt_template,
        "text_lang": settings.text_lang,
        "chat_template_sha256": chat_template_sha,
    }


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def load_cached_outputs(cache_file: Path, key: dict, samples: list[Sample]) -> list[dict] | None:
    """The cached parent outputs for exactly these samples, or None."""
    if not cache_file.is_file():
        return None
    try:
        lines = cache_file.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, IndexError) as exc:
        logger.warning("ignoring unreadable parent-output cache %s (%s)", cache_file, exc)
        return None
    if head.get("key") != key or len(rows) != len(samples):
        logger.warning("parent-output cache %s does not match these inputs; translating again", cache_file)
        return None
    if any(row.get("pair") != s.pair or row.get("source") != s.source for row, s in zip(rows, samples)):
        logger.warning("parent-output cache %s holds other sentences; translating again", cache_file)
        return None
    return rows


def write_cached_outputs(cache_file: Path, key: dict, rows: list[dict], seconds: float) -> None:
    from runtime.atomic import atomic_write_text

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    head = {"key": key, "n": len(rows), "seconds": round(seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = "\n".join(json.dumps(obj, ensure_ascii=False) for obj in [head] + rows) + "\n"
    atomic_write_text(cache_file, text)


def greedy_generate(model, prompts: list[list[int]], eos_id: int, pad_id: int, *, max_new_tokens: int | Callable[[int], int],
                    batch_size: int = 32, num_beams: int = 1, progress: Callable[[int], None] | None = None) -> list[dict]:
    """Batched decoding (left padding, similar prompt lengths together) of token-id prompts.

    `max_new_tokens` is a bound or a function of the longest prompt length in the batch (keeps
    looping outputs of damaged models from costing the full bound). Returns, per prompt,
    {"ids": new token ids cut after the first end token (included), "finished": bool}."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results: list[dict] = [{} for _ in prompts]
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = max(len(prompts[i]) for i in batch)
        bound = max_new_tokens(longest) if callable(max_new_tokens) else max_new_tokens
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, longest - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, longest - len(prompts[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=bound,
                                 do_sample=False, num_beams=num_beams, eos_token_id=eos_id, pad_token_id=pad_id,
                                 temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            new = out[row, longest:].tolist()
            finished = eos_id in new
            if finished:
                new = new[:new.index(eos_id) + 1]
            else:
                while new and new[-1] == pad_id and pad_id != eos_id:
                    new.pop()
            results[i] = {"ids": new, "finished": finished}
        if progress is not None:
            progress(len(batch))
    return results


def _load_parent(parent_dir: Path, dtype: str = "float32"):
    """The parent for translation (a seam: tests assert a cached re-run never calls it)."""
    from packager.calibrate import load_model

    return load_model(parent_dir, dtype)


def parent_outputs(parent_dir: Path, samples: list[Sample], settings: DistillSettings, progress=None) -> list[dict]:
    """Translate every sample with the parent: rows {pair, source, ids, text, finished}."""
    from packager.calibrate import CalibrationError, PromptBuilder

    loaded = _load_parent(parent_dir, settings.dtype)
    if settings.device != "cpu":
        loaded.model.to(settings.device)
    try:
        builder = PromptBuilder(loaded.model_dir, loaded.tokenizer, settings.prompt_template)
        prompts = [builder.encode(s.pair, s.source)[0] for s in samples]
    except CalibrationError as exc:
        raise DistillError(str(exc)) from None
    outputs = greedy_generate(loaded.model, prompts, loaded.eos_id, loaded.pad_id, max_new_tokens=settings.max_new_tokens,
                              batch_size=settings.gen_batch_size, num_beams=settings.num_beams, progress=progress)
    rows = []
    for sample, out in zip(samples, outputs):
        text = loaded.tokenizer.decode(out["ids"], skip_special_tokens=True).strip()
        rows.append({"pair": sample.pair, "source": sample.source, "ids": out["ids"], "text": text, "finished": out["finished"]})
    del loaded
    return rows


# ---- training ------------------------------------------------------------------------------
@dataclass
class Example:
    ids: list[int]
    prompt_len: int


def flagged_outputs(samples: list[Sample], rows: list[dict]) -> list[list[str]]:
    """The generation-error kinds of each parent output (packager.quality's detectors, with the
    usual target/source length ratio of each direction taken from its references)."""
    from packager.quality import ErrorDetector, usual_length_ratio
    from runtime.languages import parse_pair

    pairs = {s.pair: parse_pair(s.pair) for s in samples}
    ratios = {}
    for slug, pair in pairs.items():
        with_refs = [s for s in samples if s.pair == slug and s.reference]
        ratios[(pair.src.code, pair.tgt.code)] = usual_length_ratio([s.source for s in with_refs], [s.reference for s in with_refs])
    detector = ErrorDetector(sorted({p.src.code for p in pairs.values()} | {p.tgt.code for p in pairs.values()}), ratios)
    return [detector.detect(s.source, row["text"], pairs[s.pair].src, pairs[s.pair].tgt) if row["text"] else []
            for s, row in zip(samples, rows)]


def build_examples(samples: list[Sample], prompts: list[list[int]], eos_id: int, max_tokens: int) -> tuple[list[Example], dict]:
    examples, dropped = [], {"too_long": 0}
    for sample, prompt in zip(samples, prompts):
        ids = prompt + sample.target_ids
        if len(ids) > max_tokens:
            dropped["too_long"] += 1
            continue
        examples.append(Example(ids, len(prompt)))
    return examples, dropped


def token_batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of at most `batch_tokens` padded tokens, in random order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = 4096
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i].ids))
        batch, longest = [], 0
        for i in chunk:
            length = len(examples[i].ids)
            if batch and max(longest, length) * (len(batch) + 1) > batch_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, length)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], batch: list[int], pad_id: int, device: str = "cpu"):
    import torch

    longest = max(len(examples[i].ids) for i in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, i in enumerate(batch):
        ex = examples[i]
        ids[row, :len(ex.ids)] = torch.tensor(ex.ids)
        labels[row, ex.prompt_len:len(ex.ids)] = torch.tensor(ex.ids[ex.prompt_len:])
        mask[row, :len(ex.ids)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def batch_loss(model, ids, labels, mask):
    """(sum of target-token cross-entropy, number of target tokens)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def mean_loss(model, examples: list[Example], pad_id: int, batch_tokens: int, device: str = "cpu") -> float:
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = token_batches(examples, batch_tokens, random.Random(0))
    with torch.no_grad():
        for batch in batches:
            loss, n = batch_loss(model, *collate(examples, batch, pad_id, device))
            total += float(loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)


def lr_at(step: int, progress: float, settings: DistillSettings, warmup: int) -> float:
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return settings.lr * (0.1 + 0.9 * cosine)


class _WorkDir:
    """Resumable training state: weights, AdamW moments, best weights, counters (no pickle)."""

    def __init__(self, path: Path, key: dict):
        self.path = path
        self.key = json.loads(json.dumps(key))  # as stored (tuples become lists)

    def load(self, model, optimizer) -> dict | None:
        import torch
        from safetensors.torch import load_file, load_model

        state_file = self.path / STATE_NAME
        if not state_file.is_file():
            return None
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("%s: unreadable (%s); starting over", state_file, exc)
            return None
        if state.get("key") != self.key:
            logger.warning("%s holds a run with other inputs or settings; starting over", self.path)
            return None
        load_model(model, str(self.path / WEIGHTS_NAME), device=str(next(model.parameters()).device))
        moments = load_file(str(self.path / OPTIMIZER_NAME), device=str(next(model.parameters()).device))
        for name, param in model.named_parameters():
            if f"{name}::exp_avg" in moments:
                optimizer.state[param] = {"step": torch.tensor(float(state["adam_step"][name])),
                                          "exp_avg": moments[f"{name}::exp_avg"],
                                          "exp_avg_sq": moments[f"{name}::exp_avg_sq"]}
        return state

    def save(self, model, optimizer, state: dict) -> None:
        from safetensors.torch import save_file, save_model

        from runtime.atomic import atomic_write_json

        self.path.mkdir(parents=True, exist_ok=True)
        names = {id(p): n for n, p in model.named_parameters()}
        moments, steps = {}, {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                st = optimizer.state.get(param)
                if st:
                    moments[f"{names[id(param)]}::exp_avg"] = st["exp_avg"].contiguous()
                    moments[f"{names[id(param)]}::exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                    steps[names[id(param)]] = float(st["step"])
        from runtime.atomic import atomic_output

        with atomic_output(self.path / OPTIMIZER_NAME) as tmp_moments, atomic_output(self.path / WEIGHTS_NAME) as tmp_weights:
            save_model(model, str(tmp_weights))
            save_file(moments, str(tmp_moments))
        atomic_write_json(self.path / STATE_NAME, {**state, "key": self.key, "adam_step": steps})

    def save_best(self, model) -> None:
        from safetensors.torch import save_model

        self.path.mkdir(parents=True, exist_ok=True)
        from runtime.atomic import atomic_output

        with atomic_output(self.path / BEST_NAME) as tmp:
            save_model(model, str(tmp))

    def load_best(self, model) -> bool:
        from safetensors.torch import load_model

        best = self.path / BEST_NAME
        if not best.is_file():
            return False
        load_model(model, str(best), device=str(next(model.parameters()).device))
        return True


def train(model, train_set: list[Example], dev_set: list[Example], probe_set: list[Example], pad_id: int,
          settings: DistillSettings, work: _WorkDir, bar=None, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Fine-tune `model` in place; on return it holds the best weights. Returns the run record."""
    import torch

    torch.manual_seed(settings.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay)
    state = work.load(model, optimizer)
    resumed_from = None
    if state is None:
        dev0 = mean_loss(model, dev_set, pad_id, settings.batch_tokens, settings.device)
        probe0 = mean_loss(model, probe_set, pad_id, settings.batch_tokens, settings.device)
        state = {"step": 0, "epoch": 0, "batch": 0, "elapsed": 0.0, "tokens": 0, "best_dev_loss": dev0,
                 "best_step": 0, "bad_evals": 0, "dev_loss_initial": dev0, "probe_loss_initial": probe0,
                 "history": [{"step": 0, "dev_loss": dev0, "train_loss": None, "elapsed": 0.0}], "stopped": None}
        work.save_best(model)
        work.save(model, optimizer, state)
    else:
        resumed_from = state["step"]
        logger.info("resuming distillation at step %d (%.1f min)", state["step"], state["elapsed"] / 60)
    budget_seconds = settings.minutes * 60 if settings.minutes is not None else None
    warmup = min(settings.warmup_steps, max(1, (settings.max_steps or 10**9) // 10))

    def progress_fraction() -> float:
        parts = []
        if settings.max_steps:
            parts.append(state["step"] / settings.max_steps)
        if budget_seconds:
            parts.append(state["elapsed"] / budget_seconds)
        return max(parts)

    def out_of_budget() -> bool:
        return progress_fraction() >= 1.0 or state["stopped"] is not None

    last_save = time.monotonic()
    running, running_n = 0.0, 0
    task = bar.add_task("distill", total=1000) if bar is not None else None
    try:
        while not out_of_budget():
            batches = token_batches(train_set, settings.batch_tokens, random.Random(f"{settings.seed}:{state['epoch']}"))
            while state["batch"] < len(batches) and not out_of_budget():
                started = time.monotonic()
                lr = lr_at(state["step"], progress_fraction(), settings, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                ids, labels, mask = collate(train_set, batches[state["batch"]], pad_id, settings.device)
                loss_sum, n_tokens = batch_loss(model, ids, labels, mask)
                loss = loss_sum / max(n_tokens, 1)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state["batch"] += 1
                state["step"] += 1
                state["tokens"] += int(mask.sum())
                state["elapsed"] += time.monotonic() - started
                running += float(loss.detach()) * n_tokens
                running_n += n_tokens
                if state["step"] % settings.eval_every == 0 or out_of_budget():
                    eval_started = time.monotonic()
                    dev = mean_loss(model, dev_set, pad_id, settings.batch_tokens, settings.device)
                    state["history"].append({"step": state["step"], "dev_loss": dev, "train_loss": running / max(running_n, 1),
                                             "elapsed": round(state["elapsed"], 2)})
                    running, running_n = 0.0, 0
                    if dev < state["best_dev_loss"]:
                        state.update(best_dev_loss=dev, best_step=state["step"], bad_evals=0)
                        work.save_best(model)
                    else:
                        state["bad_evals"] += 1
                        if state["bad_evals"] >= settings.patience:
                            state["stopped"] = f"dev loss did not improve for {settings.patience} evaluations"
                    state["elapsed"] += time.monotonic() - eval_started
                if bar is not None:
                    bar.update(task, completed=int(1000 * min(1.0, progress_fraction())),
                               description=f"distill step {state['step']} loss {float(loss.detach()):.3f}")
                if on_step is not None:
                    on_step(state["step"], float(loss.detach()))
                if time.monotonic() - last_save > settings.checkpoint_minutes * 60:
                    work.save(model, optimizer, state)
                    last_save = time.monotonic()
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
    except KeyboardInterrupt:
        work.save(model, optimizer, state)
        logger.warning("distillation interrupted at step %d; state saved in %s (run again to resume)", state["step"], work.path)
        raise
    if state["stopped"] is None:
        state["stopped"] = "step budget" if settings.max_steps and state["step"] >= settings.max_steps else "time budget"
    work.save(model, optimizer, state)
    work.load_best(model)
    state["probe_loss_final"] = mean_loss(model, probe_set, pad_id, settings.batch_tokens, settings.device)
    state["resumed_from_step"] = resumed_from
    return state


# ---- output --------------------------------------------------------------------------------
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
    """Weights through transformers' save (its on-disk layout), everything else from the input."""
    import tempfile

    from packager.core.arch import load_arch
    from packager.core.checkpoint import CONFIG_NAME, INDEX_NAME, CheckpointReader, CheckpointWriter
    from packager.core.fingerprint import model_fingerprint
    from runtime.atomic import atomic_write_json

    dtype = _input_dtype(pruned_dir)
    model.to("cpu")
    model.to(dtype)
    with tempfile.TemporaryDirectory(prefix=".distill-save-", dir=out_dir.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
        with CheckpointReader(pruned_dir) as before:
            expected = {info.name: (info.dtype, info.shape) for info in before.infos()}
            config = before.config
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(config))  # the pruner's config, verbatim
        with CheckpointReader(tmp) as saved, CheckpointWriter(out_dir, force=force) as writer:
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
    return out_dir


# ---- the whole run ---------------------------------------------------------------------------------

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
    the result to `out_dir` (see the module docstring)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from packager.calibrate import CalibrationError, PromptBuilder
    from packager.core.pruned_model import load_pruned

    started = time.monotonic()
    settings.check()
    pruned_dir, parent_dir, out_dir = Path(pruned_dir), Path(parent_dir), Path(out_dir)
    data = [Path(p) for p in data]
    if not data:
        raise DistillError("--data: give at least one data file")
    if out_dir.exists() and not force:
        raise OutputExistsError(f"{out_dir}: output path exists; choose another path or pass --force")
    if not out_dir.parent.is_dir():
        raise DistillError(f"{out_dir}: directory {out_dir.parent} does not exist: create it first")
    if out_dir.absolute() in (pruned_dir.absolute(), parent_dir.absolute()):
        raise DistillError(f"{out_dir}: the output must not be an input directory")
    lineage = check_lineage(pruned_dir, parent_dir)
    samples = read_sources(data, settings)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(out_dir)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out_dir)

    try:
        tokenizer = AutoTokenizer.from_pretrained(pruned_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise DistillError(f"{pruned_dir}: cannot load the tokenizer ({exc}): save it next to the model") from None
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DistillError(f"{pruned_dir}: the tokenizer has no end-of-sequence token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    try:
        builder = PromptBuilder(pruned_dir, tokenizer, settings.prompt_template)
        prompts = [builder.encode(s.pair, s.source)[0] for s in samples]
    except CalibrationError as exc:
        raise DistillError(str(exc)) from None
    chat_sha = hashlib.sha256(builder.renderer.template_text.encode("utf-8")).hexdigest()

    bar = _progress_bar(show_progress)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(settings.seed)
    record: dict = {"targets": settings.targets}
    with bar if bar is not None else contextlib.nullcontext():
        dropped = {"unfinished": 0, "empty": 0}
        if settings.targets == "parent":
            key = cache_key(lineage.parent_fingerprint, data, settings, chat_sha)
            cache_file = cache_dir / f"{_key_digest(key)[:32]}.jsonl"
            rows = load_cached_outputs(cache_file, key, samples)
            record["parent_outputs"] = {"cache_file": str(cache_file), "cache": "hit" if rows is not None else "miss"}
            if rows is None:
                gen_started = time.monotonic()
                task = bar.add_task("parent translates", total=len(samples)) if bar else None
                rows = parent_outputs(parent_dir, samples, settings, (lambda n: bar.advance(task, n)) if bar else None)
                gen_seconds = time.monotonic() - gen_started
                write_cached_outputs(cache_file, key, rows, gen_seconds)
                record["parent_outputs"]["seconds"] = round(gen_seconds, 2)
            dropped["flagged"] = 0
            flags = flagged_outputs(samples, rows) if settings.drop_flagged else [[] for _ in rows]
            for sample, row, kinds in zip(samples, rows, flags):
                if not row["finished"] and not settings.keep_unfinished:
                    dropped["unfinished"] += 1
                elif not row["text"]:
                    dropped["empty"] += 1
                elif kinds:
                    dropped["flagged"] += 1
                else:
                    sample.target_ids = list(row["ids"])
        else:
            for sample in samples:
                sample.target_ids = tokenizer(sample.reference, add_special_tokens=False)["input_ids"] + [eos_id]
        kept = [(s, p) for s, p in zip(samples, prompts) if s.target_ids is not None]
        examples, too_long = build_examples([s for s, _ in kept], [p for _, p in kept], eos_id, settings.max_tokens)
        dropped.update(too_long)
        if len(examples) < 2:
            raise DistillError(f"{', '.join(map(str, data))}: only {len(examples)} usable training example(s) after "
                               f"dropping {dropped}: give more sentences")
        order = list(range(len(examples)))
        random.Random(f"{settings.seed}:dev").shuffle(order)
        n_dev = max(1, min(settings.dev_max, round(len(examples) * settings.dev_fraction)))
        dev_set = [examples[i] for i in order[:n_dev]]
        train_set = [examples[i] for i in order[n_dev:]]
        probe_set = train_set[:256]

        model = load_pruned(pruned_dir, dtype=getattr(torch, settings.dtype))
        model.to(settings.device)
        for param in model.parameters():
            param.requires_grad_(True)
        n_params = sum(p.numel() for p in model.parameters())
        examples_digest = hashlib.sha256(json.dumps([[e.ids, e.prompt_len] for e in examples]).encode()).hexdigest()
        train_key = {"pruned_fingerprint": lineage.pruned_fingerprint, "examples_sha256": examples_digest,
                     **{k: v for k, v in asdict(settings).items()
                        if k not in ("max_steps", "minutes", "checkpoint_minutes", "device", "gen_batch_size")}}
        state = train(model, train_set, dev_set, probe_set, pad_id, settings, _WorkDir(work, train_key), bar, on_step)

    provenance = {
        "format": "edge-packager-distilled",
        "version": 1,
        "family": lineage.family,
        "parent": {"dir": str(parent_dir.absolute()), "fingerprint": lineage.parent_fingerprint},
        "input": {"dir": str(pruned_dir.absolute()), "fingerprint": lineage.pruned_fingerprint,
                  "keep": {str(k): v for k, v in sorted(lineage.keep.items())} or None,
                  "already_distilled": lineage.already_distilled},
        "data": [{"path": str(p), "sha256": _file_sha(p)} for p in data],
        "targets": settings.targets,
        "trained": "all parameters (full fine-tune): embeddings, attention, norms, routers, kept experts, LM head",
        "loss": "cross-entropy on target tokens only; no load-balancing loss",
        "sentences": {"requested_per_direction": settings.sentences, "sampled": len(samples), "dropped": dropped,
                      "train": len(train_set), "dev": len(dev_set)},
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
    provenance["seconds"] = round(time.monotonic() - started, 2)
    write_output(model, pruned_dir, out_dir, provenance, force)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("distilled %s -> %s: %d steps, dev loss %.3f -> %.3f", pruned_dir, out_dir, state["step"],
                state["dev_loss_initial"], state["best_dev_loss"])
    return DistillResult(out_dir, provenance)
