"""Calibration (METHOD.md step 1): run the parent in transformers on translation prompts and
record routing statistics per layer and expert, per direction and span (packager.stats).

How a run works:
1. Data: JSONL records {src_lang, tgt_lang, src, tgt} (the harvest format; each record also
   serves the reverse direction), TSV with a header line naming the two column languages, or
   plain text (one source sentence per line, `text_lang` says its language; generation only).
   Each requested direction takes up to `max_sentences` pairs (seeded shuffle).
2. Prompts: the user message is `prompt_template` filled with the source text (placeholders
   {source}, {source_lang}, {target_lang}, {source_name}, {target_name}), rendered through
   the model's chat template (runtime.prompt). Token offsets split the prompt into the
   `prompt` span (template tokens) and the `source` span (tokens overlapping the text).
3. Output: teacher-forced mode appends the reference tokens plus the end token (`target`
   span); generation mode decodes greedily, batched with left padding, at most
   `max_new_tokens`, cut after the first end token (`generated` span).
4. Capture: one forward of the decoder (no LM head, no cache) over prompt + output, with
   forward hooks on every router module the architecture adapter names. A router returns
   (logits, applied top-k weights, top-k indices) in transformers 5; a router that returns
   bare logits is routed with `arch.route`. Routing is causal, so this pass sees exactly the
   routing of generation, at a fraction of its cost. For REAP, a pre-hook on the experts
   module feeds it every (token, chosen expert) row with weight 1 and a post-hook takes the
   row norms, then combines the rows with the real gate weights: the layer output is the
   same (up to summation order) and no expert runs twice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from packager.errors import PackagerError
from packager.stats import MODE_SPAN, PROMPT, SEQUENCE, SOURCE, RoutingStats, empty_stats

logger = logging.getLogger(__name__)

# span slots in the capture pass; the last one is the union of the others
SLOTS = (PROMPT, SOURCE, "output", SEQUENCE)
PROMPT_FIELDS = {"source", "source_lang", "target_lang", "source_name", "target_name"}


class CalibrationError(PackagerError):
    """Calibration input (data, languages, model, template) that cannot be used."""


@dataclass(frozen=True)
class CalibrationSettings:
    pairs: tuple[str, ...]                 # direction slugs, e.g. ("en-de", "de-en")
    teacher_forced: bool = False
    max_sentences: int | None = 200        # per direction; None = all
    max_new_tokens: int = 128
    batch_size: int = 16
    prompt_template: str = "{source}"
    reap: bool = True
    seed: int = 0
    text_lang: str | None = None           # language of plain-text data files
    dtype: str = "float32"

    @property
    def mode(self) -> str:
        return "teacher-forced" if self.teacher_forced else "generate"


@dataclass(frozen=True)
class Example:
    pair: str
    source: str
    target: str | None


# ---- languages ------------------------------------------------------------------------------
def parse_pair_list(spec: str) -> list[str]:
    """Direction slugs of `--pairs`: 'en-de,de-en', or the arrow forms runtime.languages reads
    ('en->de,fr', 'en<->de')."""
    from runtime.errors import LanguageError
    from runtime.languages import parse_pair, parse_pairs

    try:
        if "->" in spec:
            pairs = parse_pairs(spec)
        else:
            items = [item.strip() for item in spec.split(",")]
            if any(not item for item in items):
                raise LanguageError(f"empty direction in {spec!r}: write e.g. 'en-de,de-en'")
            pairs = [parse_pair(item) for item in items]
    except LanguageError as exc:
        raise CalibrationError(f"--pairs: {exc}") from None
    slugs: list[str] = []
    for pair in pairs:
        if pair.slug not in slugs:
            slugs.append(pair.slug)
    return slugs


def _parse_language_at(code, where: str):
    from runtime.errors import LanguageError
    from runtime.languages import parse_language

    try:
        return parse_language(code)
    except LanguageError as exc:
        raise CalibrationError(f"{where}: {exc}") from None


def _slug_languages(slug: str) -> tuple[str, str]:
    from runtime.languages import parse_pair

    pair = parse_pair(slug)
    return pair.src.code, pair.tgt.code


def _slug(src, tgt) -> str:
    from runtime.languages import Pair

    return Pair(src, tgt).slug


# ---- data ---------------------------------------------------------------------------------------
def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CalibrationError(f"{path}: data file not found") from None
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text ({exc}): convert it to UTF-8") from None
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read ({exc})") from None


def _read_jsonl(path: Path) -> Iterable[Example]:
    cache: dict = {}
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{where}: not valid JSON ({exc.msg}): one record per line") from None
        if not isinstance(record, dict):
            raise CalibrationError(f"{where}: expected a JSON object with src_lang, tgt_lang, src, tgt")
        missing = [key for key in ("src_lang", "tgt_lang", "src", "tgt") if key not in record]
        if missing:
            raise CalibrationError(f"{where}: record lacks {', '.join(missing)} (misaligned data): every record needs src_lang, tgt_lang, src and tgt")
        for key in ("src", "tgt"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise CalibrationError(f"{where}: empty or non-text {key!r} (misaligned data): remove the record or fill it in")
        langs = []
        for key in ("src_lang", "tgt_lang"):
            code = record[key]
            if code not in cache:
                cache[code] = _parse_language_at(code, f"{where}: {key}")
            langs.append(cache[code])
        src, tgt = langs
        yield Example(_slug(src, tgt), record["src"], record["tgt"])
        yield Example(_slug(tgt, src), record["tgt"], record["src"])


def _read_tsv(path: Path) -> Iterable[Example]:
    lines = _lines(path)
    if not lines:
        return
    header = lines[0].split("\t")
    if len(header) != 2:
        raise CalibrationError(f"{path}:1: the header must name the two column languages separated by a tab (e.g. 'en<TAB>de'), found {len(header)} fields")
    src, tgt = (_parse_language_at(code.strip(), f"{path}:1") for code in header)
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise CalibrationError(f"{path}:{number}: expected 2 tab-separated columns ({src.code}, {tgt.code}), found {len(fields)} (misaligned data)")
        if not fields[0].strip() or not fields[1].strip():
            raise CalibrationError(f"{path}:{number}: an empty column (misaligned data): both sides need text")
        yield Example(_slug(src, tgt), fields[0], fields[1])
        yield Example(_slug(tgt, src), fields[1], fields[0])


def _read_text(path: Path, text_lang: str | None, pairs: Sequence[str]) -> Iterable[Example]:
    from runtime.languages import parse_pair

    if text_lang is None:
        raise CalibrationError(f"{path}: plain text has no language: say which with --text-lang (or use TSV/JSONL)")
    lang = _parse_language_at(text_lang, "--text-lang")
    lines = [line for line in _lines(path) if line.strip()]
    for slug in pairs:
        if parse_pair(slug).src == lang:
            for line in lines:
                yield Example(slug, line, None)


def read_examples(paths: Sequence[Path], settings: CalibrationSettings) -> dict[str, list[Example]]:
    """Examples per requested direction (seeded sample of at most `max_sentences`)."""
    found: dict[str, list[Example]] = {}
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            examples = list(_read_jsonl(path))
        elif suffix in (".tsv", ".tab"):
            examples = list(_read_tsv(path))
        else:
            examples = list(_read_text(path, settings.text_lang, settings.pairs))
            if settings.teacher_forced:
                raise CalibrationError(f"{path}: plain text has no reference translations: --teacher-forced needs TSV or JSONL data")
        if not examples:
            raise CalibrationError(f"{path}: no sentences in the file (empty data): give a file with at least one pair")
        for example in examples:
            found.setdefault(example.pair, []).append(example)
    names = ", ".join(str(p) for p in paths)
    selected: dict[str, list[Example]] = {}
    for slug in settings.pairs:
        pool = found.get(slug, [])
        if not pool:
            available = ", ".join(sorted(found)) or "none"
            raise CalibrationError(f"{names}: no {slug} sentences (directions in the data: {available}): add data for it or drop it from --pairs")
        if settings.max_sentences is not None and len(pool) > settings.max_sentences:
            # seeded by the unordered language pair: en-de and de-en sample the same records
            # (their pools hold the same records in the same order), so both directions see
            # the same content, which the JSD of planning compares
            rng = random.Random(f"{settings.seed}:{'|'.join(sorted(_slug_languages(slug)))}")
            pool = rng.sample(pool, settings.max_sentences)
        selected[slug] = pool
    return selected


# ---- prompts --------------------------------------------------------------------------------------
def check_prompt_template(template: str) -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise CalibrationError(f"--prompt-template {template!r}: {exc}") from None
    unknown = sorted(set(fields) - PROMPT_FIELDS)
    if unknown or fields.count("source") != 1:
        raise CalibrationError(
            f"--prompt-template {template!r}: needs {{source}} exactly once and may use only "
            f"{', '.join('{' + f + '}' for f in sorted(PROMPT_FIELDS))} (unknown: {', '.join(unknown) or 'none'})"
        )


class PromptBuilder:
    """Token ids and span labels of prompts, from the chat template and the prompt template."""

    def __init__(self, model_dir: Path, tokenizer, prompt_template: str):
        from runtime.errors import PromptError
        from runtime.prompt import PromptRenderer

        check_prompt_template(prompt_template)
        try:
            self.renderer = PromptRenderer.from_model_dir(model_dir)
        except PromptError as exc:
            raise CalibrationError(str(exc)) from None
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self._frames: dict[str, tuple[str, str]] = {}

    def _frame(self, slug: str) -> tuple[str, str]:
        """(text before, text after) the source in the rendered prompt of one direction."""
        if slug not in self._frames:
            from runtime.errors import PromptError
            from runtime.languages import parse_pair

            pair = parse_pair(slug)
            marker = "\ue000calibration-source\ue001"
            content = self.prompt_template.format(source=marker, source_lang=pair.src.code, target_lang=pair.tgt.code,
                                                  source_name=pair.src.name, target_name=pair.tgt.name)
            try:
                rendered = self.renderer.render(content, pair.src, pair.tgt)
            except PromptError as exc:
                raise CalibrationError(str(exc)) from None
            if rendered.count(marker) != 1:
                raise CalibrationError(f"{self.renderer.source}: the chat template does not place the message exactly once in the prompt")
            before, after = rendered.split(marker)
            self._frames[slug] = (before, after)
        return self._frames[slug]

    def encode(self, slug: str, source: str) -> tuple[list[int], list[int]]:
        """Prompt token ids and their span slots (0 prompt, 1 source)."""
        before, after = self._frame(slug)
        text = before + source + after
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start, end = len(before), len(before) + len(source)
        slots = [1 if (a < end and b > start) else 0 for a, b in encoded["offset_mapping"]]
        if 1 not in slots:
            raise CalibrationError(f"source text {source[:40]!r} produced no tokens: remove empty or whitespace-only sentences")
        return list(encoded["input_ids"]), slots


# ---- capture ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    token_group: object  # LongTensor [B*S]: b * 3 + slot, padding -> B * 3
    counts: object       # [B, 4] tokens per (sequence, slot), slot 3 = whole sequence
    keys: object         # LongTensor [B, 4]: pair_pos * 4 + slot
    token_keys: object   # LongTensor [2, B*S]: key of the token's slot and of its sequence (padding -> dummy)


class RoutingRecorder:
    """Forward hooks that accumulate routing statistics of every MoE layer (see module docstring)."""

    def __init__(self, model, arch, config, n_pairs: int, reap: bool):
        import torch

        self.arch = arch
        self.config = config
        self.layers = arch.moe_layers(config)
        self.n_experts = arch.n_experts(config)
        self.n_keys = n_pairs * len(SLOTS)
        shape = (len(self.layers), self.n_keys + 1, self.n_experts)  # +1: dummy key for padding
        self.mass = torch.zeros(shape, dtype=torch.float64)
        self.selected = torch.zeros(shape, dtype=torch.float64)
        self.reap_sum = torch.zeros(shape, dtype=torch.float64) if reap else None
        self.reap_tokens = torch.zeros(shape, dtype=torch.float64) if reap else None
        self.tokens = torch.zeros(self.n_keys + 1, dtype=torch.float64)
        self.sequences = torch.zeros(self.n_keys + 1, dtype=torch.float64)
        self.batch: Batch | None = None
        self.hook_seconds = 0.0  # time spent inside the hooks (the capture's own cost)
        self._pending: dict[int, tuple] = {}
        self.handles = []
        for pos, layer_idx in enumerate(self.layers):
            router = model.get_submodule(arch.router_module(layer_idx))
            self.handles.append(router.register_forward_hook(self._router_hook(pos)))
            if reap:
                experts = model.get_submodule(arch.experts_module(layer_idx))
                self.handles.append(experts.register_forward_pre_hook(self._experts_pre_hook(pos), with_kwargs=True))
                self.handles.append(experts.register_forward_hook(self._experts_hook(pos)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def set_batch(self, slots, pair_pos) -> None:
        """slots: LongTensor [B, S] (0 prompt, 1 source, 2 output, -1 padding); pair_pos: [B]."""
        import torch

        n_seq = slots.shape[0]
        valid = slots >= 0
        group = torch.where(valid, torch.arange(n_seq).unsqueeze(1) * 3 + slots, torch.full_like(slots, n_seq * 3))
        per_slot = torch.bincount(group.reshape(-1), minlength=n_seq * 3 + 1)[:-1].view(n_seq, 3).double()
        counts = torch.cat([per_slot, per_slot.sum(1, keepdim=True)], dim=1)
        keys = pair_pos.unsqueeze(1) * len(SLOTS) + torch.arange(len(SLOTS))
        dummy = torch.full_like(slots, self.n_keys)
        slot_key = torch.where(valid, pair_pos.unsqueeze(1) * len(SLOTS) + slots, dummy)
        seq_key = torch.where(valid, (pair_pos * len(SLOTS) + len(SLOTS) - 1).unsqueeze(1).expand_as(slots), dummy)
        self.batch = Batch(group.reshape(-1), counts, keys, torch.stack([slot_key.reshape(-1), seq_key.reshape(-1)]))
        present = counts > 0
        self.tokens.index_add_(0, keys[present], counts[present])
        self.sequences.index_add_(0, keys[present], torch.ones_like(counts[present]))

    def _routing(self, output):
        if isinstance(output, tuple) and len(output) == 3:
            _, weights, idx = output
            return idx, weights
        idx, weights = self.arch.route(output, self.config)  # a router that returns bare logits
        return idx.reshape(-1, idx.shape[-1]), weights.reshape(-1, weights.shape[-1])

    def _router_hook(self, pos: int):
        import torch

        def hook(module, args, output):
            if self.batch is None:
                return
            started = time.perf_counter()
            idx, weights = self._routing(output)
            batch = self.batch
            weights = weights.float()
            normalised = weights / weights.sum(dim=-1, keepdim=True)
            n_tokens, n_experts = idx.shape[0], self.n_experts
            per_token = torch.zeros(n_tokens, 2 * n_experts)
            per_token.scatter_(1, idx, normalised)
            per_token.scatter_(1, idx + n_experts, 1.0)
            n_seq = batch.counts.shape[0]
            grouped = torch.zeros(n_seq * 3 + 1, 2 * n_experts).index_add_(0, batch.token_group, per_token)[:-1]
            grouped = grouped.view(n_seq, 3, 2 * n_experts)
            grouped = torch.cat([grouped, grouped.sum(dim=1, keepdim=True)], dim=1).double()
            present = batch.counts > 0
            keys = batch.keys[present]
            means = grouped[..., :n_experts][present] / batch.counts[present].unsqueeze(1)
            self.mass[pos].index_add_(0, keys, means)
            self.selected[pos].index_add_(0, keys, grouped[..., n_experts:][present])
            self.hook_seconds += time.perf_counter() - started

        return hook

    def _experts_pre_hook(self, pos: int):
        import torch

        def hook(module, args, kwargs):
            if self.batch is None:
                return None
            started = time.perf_counter()
            hidden, idx, weights = args[0], args[1], args[2]
            top_k = idx.shape[-1]
            idx, weights = idx.reshape(-1, top_k), weights.reshape(-1, top_k)
            self._pending[pos] = (idx, weights, hidden.shape)
            rows = hidden.reshape(-1, hidden.shape[-1]).repeat_interleave(top_k, dim=0)
            row_idx = idx.reshape(-1, 1)
            ones = torch.ones(row_idx.shape, dtype=weights.dtype, device=weights.device)
            self.hook_seconds += time.perf_counter() - started
            return (rows, row_idx, ones), kwargs

        return hook

    def _experts_hook(self, pos: int):
        import torch

        def hook(module, args, output):
            if self.batch is None or pos not in self._pending:
                return None
            started = time.perf_counter()
            idx, weights, hidden_shape = self._pending.pop(pos)
            n_tokens, top_k = idx.shape
            rows = output.view(n_tokens, top_k, -1)
            terms = (weights.float() * rows.float().norm(dim=-1)).double()  # [T, k]
            flat_experts = idx.reshape(-1)
            for keys in self.batch.token_keys:
                flat = (keys.unsqueeze(1).expand(n_tokens, top_k).reshape(-1)) * self.n_experts + flat_experts
                self.reap_sum[pos].view(-1).index_add_(0, flat, terms.reshape(-1))
                self.reap_tokens[pos].view(-1).index_add_(0, flat, torch.ones_like(terms.reshape(-1)))
            combined = (rows * weights.unsqueeze(-1).to(rows.dtype)).sum(dim=1).reshape(hidden_shape)
            self.hook_seconds += time.perf_counter() - started
            return combined

        return hook

    def to_stats(self, stats: RoutingStats, pair_slugs: Sequence[str], output_span: str) -> None:
        names = {PROMPT: PROMPT, SOURCE: SOURCE, "output": output_span, SEQUENCE: SEQUENCE}
        n_layers = len(self.layers)
        for pair_pos, slug in enumerate(pair_slugs):
            for slot, slot_name in enumerate(SLOTS):
                key = pair_pos * len(SLOTS) + slot
                if self.sequences[key] == 0:
                    continue
                span = names[slot_name]
                stats.add("mass", slug, span, self.mass[:, key].numpy())
                stats.add("selected", slug, span, self.selected[:, key].numpy())
                stats.add("tokens", slug, span, np.full((n_layers, self.n_experts), float(self.tokens[key])))
                stats.add("sequences", slug, span, np.full((n_layers, self.n_experts), float(self.sequences[key])))
                if self.reap_sum is not None:
                    stats.add("reap", slug, span, self.reap_sum[:, key].numpy())
                    stats.add("reap_tokens", slug, span, self.reap_tokens[:, key].numpy())


# ---- model -----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    config: dict
    arch: object
    model_dir: Path
    fingerprint: str
    eos_id: int
    pad_id: int


def load_model(model_dir: Path, dtype: str = "float32") -> LoadedModel:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from packager.arch import load_arch
    from packager.checkpoint import CheckpointReader
    from packager.fingerprint import model_fingerprint

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CalibrationError(f"{model_dir}: no config.json: give a Hugging Face save_pretrained directory")
    reader = CheckpointReader(model_dir)
    try:
        config = dict(reader.config)
        arch = load_arch(config)
        fingerprint = model_fingerprint(reader)
    finally:
        reader.close()
    if not arch.is_uniform(config):
        raise CalibrationError(f"{model_dir}: expert counts differ between layers (a pruned model): calibrate the parent")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise CalibrationError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{model_dir}: cannot load the tokenizer ({exc}): save it next to the model") from None
    if not getattr(tokenizer, "is_fast", False):
        raise CalibrationError(f"{model_dir}: needs a fast tokenizer (tokenizer.json) for token offsets")
    transformers.utils.logging.disable_progress_bar()  # our own progress bar covers the run
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, trust_remote_code=False, use_safetensors=True)
    model.eval()
    eos_id = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    if eos_id is None:
        raise CalibrationError(f"{model_dir}: no end-of-sequence token in the tokenizer or generation config")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return LoadedModel(model, tokenizer, config, arch, model_dir, fingerprint, int(eos_id), int(pad_id))


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_outputs(loaded: LoadedModel, prompts: list[list[int]], settings: CalibrationSettings, progress=None) -> list[list[int]]:
    """Greedy, batched (left padding, similar lengths together), bounded, cut after the end token."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    outputs: list[list[int]] = [[] for _ in prompts]
    for batch in _batches(order, settings.batch_size):
        longest = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), longest), loaded.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, longest - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, longest - len(prompts[i]):] = 1
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                        do_sample=False, num_beams=1, eos_token_id=loaded.eos_id,
                                        pad_token_id=loaded.pad_id, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            new = out[row, longest:].tolist()
            if loaded.eos_id in new:
                new = new[:new.index(loaded.eos_id) + 1]
            outputs[i] = new
        if progress is not None:
            progress(len(batch))
    return outputs


def capture(loaded: LoadedModel, recorder: RoutingRecorder, sequences: list[tuple[list[int], list[int], int]],
            batch_size: int, progress=None) -> None:
    """One decoder forward per batch (right padding) with the recorder's hooks active.
    sequences: (token ids, span slots 0/1/2, pair position)."""
    import torch

    decoder = loaded.model.base_model
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), i))
    for batch in _batches(order, batch_size):
        longest = max(len(sequences[i][0]) for i in batch)
        ids = torch.full((len(batch), longest), loaded.pad_id, dtype=torch.long)
        slots = torch.full((len(batch), longest), -1, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens, token_slots, _ = sequences[i]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            slots[row, :len(tokens)] = torch.tensor(token_slots)
            mask[row, :len(tokens)] = 1
        recorder.set_batch(slots, torch.tensor([sequences[i][2] for i in batch]))
        try:
            with torch.no_grad():
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            recorder.batch = None
        if progress is not None:
            progress(len(batch))


# ---- the whole run -----------------------------------------------------------------------------------
def _versions() -> dict:
    import torch
    import transformers

    from packager import __version__

    return {"packager": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)


def calibrate(model_dir: str | Path, data: Sequence[str | Path], settings: CalibrationSettings,
              command: str | None = None, show_progress: bool = False, loaded: LoadedModel | None = None) -> RoutingStats:
    """Routing statistics of `model_dir` on `data` for `settings.pairs` (see module docstring)."""
    from packager.fingerprint import file_sha256

    if not settings.pairs:
        raise CalibrationError("--pairs: give at least one direction, e.g. en-de,de-en")
    if settings.batch_size < 1 or settings.max_new_tokens < 1 or (settings.max_sentences is not None and settings.max_sentences < 1):
        raise CalibrationError("--batch-size, --max-new-tokens and --max-sentences must be at least 1")
    check_prompt_template(settings.prompt_template)
    examples = read_examples([Path(p) for p in data], settings)
    loaded = loaded or load_model(Path(model_dir), settings.dtype)
    builder = PromptBuilder(loaded.model_dir, loaded.tokenizer, settings.prompt_template)

    flat = [(pair_pos, ex) for pair_pos, slug in enumerate(settings.pairs) for ex in examples[slug]]
    encoded = [builder.encode(ex.pair, ex.source) for _, ex in flat]
    bar = _progress_bar(show_progress)
    started = time.perf_counter()
    with bar if bar is not None else _NullContext():
        if settings.teacher_forced:
            outputs = [loaded.tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [loaded.eos_id] for _, ex in flat]
        else:
            task = bar.add_task("generating", total=len(flat)) if bar else None
            outputs = generate_outputs(loaded, [ids for ids, _ in encoded], settings,
                                       (lambda n: bar.advance(task, n)) if bar else None)
        sequences = [(ids + out, slots + [2] * len(out), pair_pos)
                     for (ids, slots), out, (pair_pos, _) in zip(encoded, outputs, flat)]
        recorder = RoutingRecorder(loaded.model, loaded.arch, loaded.config, len(settings.pairs), settings.reap)
        try:
            task = bar.add_task("recording routing", total=len(sequences)) if bar else None
            capture(loaded, recorder, sequences, settings.batch_size, (lambda n: bar.advance(task, n)) if bar else None)
        finally:
            recorder.remove()
    elapsed = time.perf_counter() - started

    arch, config = loaded.arch, loaded.config
    renderer = builder.renderer
    stats = empty_stats({
        "model_fingerprint": loaded.fingerprint,
        "family": arch.family,
        "moe_layers": arch.moe_layers(config),
        "n_experts": arch.n_experts(config),
        "top_k": arch.top_k(config),
        "mode": settings.mode,
        "prompt_template": settings.prompt_template,
        "chat_template_sha256": hashlib.sha256(renderer.template_text.encode("utf-8")).hexdigest(),
        "max_new_tokens": None if settings.teacher_forced else settings.max_new_tokens,
        "reap": settings.reap,
    })
    if arch.routing_kind == "sigmoid_group" and int(arch.routing_param(config, "n_group") or 1) > 1:
        stats.meta["routing_groups"] = {
            "n_group": int(arch.routing_param(config, "n_group")),
            "topk_group": int(arch.routing_param(config, "topk_group") or arch.routing_param(config, "n_group")),
            "group_score_top": int(arch.routing.get("group_score_top", 1)),
        }
    recorder.to_stats(stats, settings.pairs, MODE_SPAN[settings.mode])
    stats.meta["provenance"] = [{
        "command": command,
        "model": {"path": str(loaded.model_dir), "fingerprint": loaded.fingerprint},
        "inputs": [{"path": str(p), "sha256": file_sha256(p)} for p in data],
        "sentences": {slug: len(examples[slug]) for slug in settings.pairs},
        "tokens": {slug: int(stats.get("tokens", slug, SEQUENCE)[0, 0]) for slug in settings.pairs},
        "settings": {k: v for k, v in asdict(settings).items() if k != "pairs"},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(elapsed, 3),
    }]
    return stats


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
