"""The torch-free half of calibration, shared by both backends (packager.calibrate for
transformers, packager.calibrate_gguf for llama.cpp), so the two cannot drift apart:

- settings and their checks (`CalibrationSettings`, `check_settings`);
- data reading: JSONL harvest records, TSV, plain text (`read_examples`);
- prompts: the chat template plus the prompt template, tokenized with character offsets that
  split the `prompt` span from the `source` span (`PromptBuilder`; any tokenizer that gives
  ids and character offsets plugs in);
- the span accumulator (`SpanAccumulator`): per-token routing (top-k ids, applied weights,
  optional REAP terms) of whole sequences -> the sums and counts of packager.core.stats;
- the STATS metadata and provenance of a run (`stats_for_run`).

Nothing here imports torch or transformers, at import time or later.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import random
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from packager.core.errors import PackagerError
from packager.core.stats import (
    MASS, MODE_SPAN, PROMPT, REAP, REAP_TOKENS, SELECTED, SEQUENCE, SEQUENCES, SOURCE, TOKENS, RoutingStats, empty_stats,
)

# span slots of a sequence; the last one is the union of the others
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
    # transformers backend only (packager.calibrate, packager.core.layer_stream):
    device: str = "auto"                   # cpu | cuda | cuda:N | auto
    execution: str = "auto"                # whole | streamed | auto (packager.core.execution.choose_execution)
    max_activation_mb: int | None = None   # streamed: hidden states above this spill to disk (None = auto)
    spill_dir: str | None = None           # streamed: where the spill file goes (None = system temp dir)
    expert_group_bytes: int | None = None  # streamed: experts are loaded in groups of about this size (None = 256 MiB)
    generator: str | None = None           # a GGUF of the parent that translates for streamed generate mode
    cache_dir: str | None = None           # where generated translations are cached (None = no cache)
    data_slice: tuple[int, int] | None = None  # (i, n): every n-th selected sentence from the i-th (a calibration shard)

    @property
    def mode(self) -> str:
        return "teacher-forced" if self.teacher_forced else "generate"


@dataclass(frozen=True)
class Example:
    pair: str
    source: str
    target: str | None


def check_settings(settings: CalibrationSettings) -> None:
    """The checks every backend makes before reading data or loading a model."""
    if not settings.pairs:
        raise CalibrationError("--pairs: give at least one direction, e.g. en-de,de-en")
    if settings.batch_size < 1 or settings.max_new_tokens < 1 or (settings.max_sentences is not None and settings.max_sentences < 1):
        raise CalibrationError("--batch-size, --max-new-tokens and --max-sentences must be at least 1")
    check_prompt_template(settings.prompt_template)


# ---- languages ------------------------------------------------------------------------------
def parse_pair_list(spec: str) -> list[str]:
    """Direction slugs of `--pairs` (runtime.languages.parse_pair_list, the one grammar)."""
    from runtime.errors import LanguageError
    from runtime.languages import parse_pair_list as parse

    try:
        return [pair.slug for pair in parse(spec)]
    except LanguageError as exc:
        raise CalibrationError(f"--pairs: {exc}") from None


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
        if settings.data_slice is not None:  # slices of the same sample: their statistics add up to the whole
            index, count = settings.data_slice
            pool = pool[index::count]
            if not pool:
                raise CalibrationError(f"{names}: slice {index + 1} of {count} of the {slug} sentences is empty: use fewer slices")
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


# (ids, character offsets [start, end) of each token) of a text, special tokens parsed
Encoder = Callable[[str], tuple[list[int], list[tuple[int, int]]]]


def char_offsets_from_pieces(text: str, pieces: Sequence[bytes]) -> list[tuple[int, int]] | None:
    """Character offsets of tokens whose byte pieces concatenate to `text` in UTF-8 (None when
    they do not). A token that ends or starts inside a multi-byte character covers the whole
    character, as Hugging Face's offsets do for byte-level BPE."""
    data = text.encode("utf-8")
    if b"".join(pieces) != data:
        return None
    starts = []  # byte start of every character
    position = 0
    for char in text:
        starts.append(position)
        position += len(char.encode("utf-8"))
    offsets = []
    byte = 0
    for piece in pieces:
        begin, end = byte, byte + len(piece)
        byte = end
        offsets.append((bisect.bisect_right(starts, begin) - 1 if piece else bisect.bisect_left(starts, begin),
                        bisect.bisect_left(starts, end)))
    return offsets


class PromptBuilder:
    """Token ids and span labels of prompts, from the chat template and the prompt template.

    `tokenizer` is a Hugging Face fast tokenizer, or None when `encode` is given (a function
    text -> (ids, character offsets)); `renderer` replaces the model directory's template."""

    def __init__(self, model_dir: Path | None, tokenizer, prompt_template: str, *, renderer=None,
                 encode: Encoder | None = None):
        from runtime.errors import PromptError
        from runtime.prompt import PromptRenderer

        check_prompt_template(prompt_template)
        if renderer is None:
            try:
                renderer = PromptRenderer.from_model_dir(model_dir)
            except PromptError as exc:
                raise CalibrationError(str(exc)) from None
        self.renderer = renderer
        self.tokenizer = tokenizer
        self._encode = encode or self._encode_hf
        self.prompt_template = prompt_template
        self._frames: dict[str, tuple[str, str]] = {}

    def _encode_hf(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]

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
        ids, offsets = self._encode(text)
        start, end = len(before), len(before) + len(source)
        slots = [1 if (a < end and b > start) else 0 for a, b in offsets]
        if 1 not in slots:
            raise CalibrationError(f"source text {source[:40]!r} produced no tokens: remove empty or whitespace-only sentences")
        return list(ids), slots


# ---- accumulation ------------------------------------------------------------------------------------
class SpanAccumulator:
    """Sums and counts of packager.core.stats for whole sequences, from per-token routing.

    `add_sequence` takes, per MoE layer (rows in `moe_layers` order), the top-k expert ids
    [T, k] and the weights the model applied [T, k] of every token of one sequence, the
    token's slot (0 prompt, 1 source, 2 output) and optionally the REAP terms
    (applied weight x L2 norm of the expert's output) [T, k]."""

    def __init__(self, n_layers: int, n_experts: int, n_pairs: int, reap: bool):
        self.n_layers, self.n_experts = n_layers, n_experts
        shape = (n_layers, n_pairs * len(SLOTS), n_experts)
        self.mass = np.zeros(shape)
        self.selected = np.zeros(shape)
        self.reap_sum = np.zeros(shape) if reap else None
        self.reap_tokens = np.zeros(shape) if reap else None
        self.tokens = np.zeros(n_pairs * len(SLOTS))
        self.sequences = np.zeros(n_pairs * len(SLOTS))

    def add_sequence(self, pair_pos: int, slots: Sequence[int], idx: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                     reap_terms: Sequence[np.ndarray] | None = None) -> None:
        slots = np.asarray(slots)
        n_tokens = len(slots)
        masks = [(slot, slots == slot) for slot in range(len(SLOTS) - 1)] + [(len(SLOTS) - 1, np.ones(n_tokens, bool))]
        for pos in range(self.n_layers):
            layer_idx = np.asarray(idx[pos], dtype=np.int64).reshape(n_tokens, -1)
            layer_w = np.asarray(weights[pos], dtype=np.float64).reshape(n_tokens, -1)
            if layer_idx.min(initial=0) < 0 or layer_idx.max(initial=0) >= self.n_experts:
                raise CalibrationError(f"MoE layer {pos}: expert ids outside 0..{self.n_experts - 1}: the model's routing was misread")
            rows = np.arange(n_tokens)[:, None]
            normalised = np.zeros((n_tokens, self.n_experts))
            normalised[rows, layer_idx] = layer_w / layer_w.sum(axis=1, keepdims=True)
            chosen = np.zeros((n_tokens, self.n_experts))
            chosen[rows, layer_idx] = 1.0
            terms = None
            if self.reap_sum is not None and reap_terms is not None:
                terms = np.zeros((n_tokens, self.n_experts))
                np.add.at(terms, (np.broadcast_to(rows, layer_idx.shape), layer_idx), np.asarray(reap_terms[pos], dtype=np.float64))
            for slot, mask in masks:
                count = int(mask.sum())
                if not count:
                    continue
                key = pair_pos * len(SLOTS) + slot
                self.mass[pos, key] += normalised[mask].sum(axis=0) / count
                self.selected[pos, key] += chosen[mask].sum(axis=0)
                if terms is not None:
                    self.reap_sum[pos, key] += terms[mask].sum(axis=0)
                    self.reap_tokens[pos, key] += chosen[mask].sum(axis=0)
        for slot, mask in masks:
            count = int(mask.sum())
            if count:
                key = pair_pos * len(SLOTS) + slot
                self.tokens[key] += count
                self.sequences[key] += 1

    def to_stats(self, stats: RoutingStats, pair_slugs: Sequence[str], output_span: str) -> None:
        add_span_stats(stats, pair_slugs, output_span, mass=self.mass, selected=self.selected, tokens=self.tokens,
                       sequences=self.sequences, reap=self.reap_sum, reap_tokens=self.reap_tokens)


def add_span_stats(stats: RoutingStats, pair_slugs: Sequence[str], output_span: str, *, mass, selected, tokens,
                   sequences, reap=None, reap_tokens=None) -> None:
    """Write accumulated sums into `stats`, one tensor per signal, direction and span.
    mass / selected / reap / reap_tokens: [n_layers, n_keys(+1), n_experts]; tokens, sequences:
    [n_keys(+1)], key = pair position * len(SLOTS) + slot (both calibration backends)."""
    names = {PROMPT: PROMPT, SOURCE: SOURCE, "output": output_span, SEQUENCE: SEQUENCE}
    shape = (mass.shape[0], mass.shape[2])
    for pair_pos, slug in enumerate(pair_slugs):
        for slot, slot_name in enumerate(SLOTS):
            key = pair_pos * len(SLOTS) + slot
            if sequences[key] == 0:
                continue
            span = names[slot_name]
            stats.add(MASS, slug, span, mass[:, key])
            stats.add(SELECTED, slug, span, selected[:, key])
            stats.add(TOKENS, slug, span, np.full(shape, float(tokens[key])))
            stats.add(SEQUENCES, slug, span, np.full(shape, float(sequences[key])))
            if reap is not None:
                stats.add(REAP, slug, span, reap[:, key])
                stats.add(REAP_TOKENS, slug, span, reap_tokens[:, key])


# ---- the STATS file of a run -------------------------------------------------------------------------
def stats_for_run(*, fingerprint: str, family: str, moe_layers: list[int], n_experts: int, top_k: int,
                  settings: CalibrationSettings, chat_template: str, reap: bool, model_path: str | Path,
                  data: Sequence[str | Path], examples: dict[str, list[Example]], command: str | None,
                  versions: dict, seconds: float, execution: dict, extra_meta: dict | None = None,
                  fill: Callable[[RoutingStats], None]) -> RoutingStats:
    """A RoutingStats with the identity, settings and provenance of one calibration run;
    `fill` adds the tensors (e.g. SpanAccumulator.to_stats)."""
    from packager.core.fingerprint import file_sha256

    stats = empty_stats({
        "model_fingerprint": fingerprint,
        "family": family,
        "moe_layers": list(moe_layers),
        "n_experts": int(n_experts),
        "top_k": int(top_k),
        "mode": settings.mode,
        "prompt_template": settings.prompt_template,
        "chat_template_sha256": hashlib.sha256(chat_template.encode("utf-8")).hexdigest(),
        "max_new_tokens": None if settings.teacher_forced else settings.max_new_tokens,
        "reap": bool(reap),
        **(extra_meta or {}),
    })
    fill(stats)
    stats.meta["provenance"] = [{
        "command": command,
        "model": {"path": str(model_path), "fingerprint": fingerprint},
        "inputs": [{"path": str(p), "sha256": file_sha256(p)} for p in data],
        "sentences": {slug: len(examples[slug]) for slug in settings.pairs},
        "tokens": {slug: int(stats.get(TOKENS, slug, SEQUENCE)[0, 0]) for slug in settings.pairs},
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("pairs", "cache_dir", "spill_dir")},
        "execution": execution,
        "versions": {**versions, "python": sys.version.split()[0]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
    }]
    return stats


def output_span(settings: CalibrationSettings) -> str:
    return MODE_SPAN[settings.mode]


# ---- progress ----------------------------------------------------------------------------------------
def progress_bar(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)


class NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
