"""Translating real text: long inputs, placeholders and markup, gettext catalogs, one Python API.

`Translator(bundle, threads=...)` opens a bundle (checked like `edge-translate` does) or any
model path `runtime.backends` accepts, and translates lists of strings:

    with Translator("bundles/en-de", threads=2, src="en", tgt="de") as translator:
        translator.translate(["Open the file", "The file %s was not found"])

Every text is handled the same way (`TextTranslator`, also what `packager verify` runs):
1. each line is cut into pieces (runtime.segment): separators (white space at the ends,
   control characters, bidi marks) stay verbatim; a line longer than `segment_chars` or than the
   model's context is cut into sentences, a sentence that still does not fit at clause marks or
   spaces; a piece that cannot be cut is passed through untranslated with a warning;
2. each piece is translated as it is first; when that loses one of its placeholders, markup,
   entities, escapes, emoji or its accelerator (runtime.protect.spans_kept), it is translated
   again with those spans as sentinels (`stats.sentinel_retries`), and a translation that loses or
   repeats a sentinel is redone by translating the text around the spans
   (`stats.sentinel_fallbacks`). Raw first wins chrF++ where the model keeps the spans itself
   (+0.8/+1.0 on the parent, bench/results/protection.json) and loses no more of them;
3. pieces go to the backend `batch_size` at a time; `Translator` opens the backend with
   `max_batch=batch_size`, so both backends decode them together (see `generate_batch` of
   llama_cpp_backend / onnx_backend for how, and how close that is to one at a time);
4. one piece that fails (a backend error) is passed through and warned about; the rest go on.
Output line N is the translation of input line N: a text keeps its line count.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from runtime.backends.base import GREEDY, Backend, Sampling
from runtime.errors import EdgeError
from runtime.languages import Language, parse_language
from runtime.protect import Protected, join_around, protect, put_accelerator, restore, spans_kept
from runtime.segment import has_letters, pieces, split_separators

logger = logging.getLogger(__name__)

# generation budget per piece: generous for every direction (zh->en is ~2.4x longer in
# characters), small enough that a loop ends quickly (packager verify uses the same rule)
NEW_TOKENS_PER_SOURCE_TOKEN = 3
NEW_TOKENS_SLACK = 12
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_SEGMENT_CHARS = 400
DEFAULT_BATCH_SIZE = 8

Warn = Callable[[int, str], None]  # (index of the text, message)


@dataclass
class TranslateStats:
    """Counters over every text translated (see the module doc)."""

    texts: int = 0
    pieces: int = 0
    split_lines: int = 0          # lines cut into more than one piece
    passed_through: int = 0       # pieces that could not be cut to fit: copied untranslated
    failed: int = 0               # pieces the backend failed on: copied untranslated
    protected_pieces: int = 0     # pieces with at least one protected span or accelerator
    protected_spans: int = 0
    sentinel_retries: int = 0     # raw translation lost a span: translated again with sentinels
    sentinel_fallbacks: int = 0   # sentinels lost or repeated: translated around the spans
    accelerators: int = 0
    new_tokens: int = 0
    hit_limit: int = 0            # pieces that used their whole generation budget

    def as_dict(self) -> dict:
        return asdict(self)


def generation_budget(n_source_tokens: int, max_new_tokens: int) -> int:
    return min(max_new_tokens, NEW_TOKENS_PER_SOURCE_TOKEN * n_source_tokens + NEW_TOKENS_SLACK)


@dataclass
class _Unit:
    text_idx: int
    source: str
    protected: Protected | None = None
    out: str | None = None
    hit_limit: bool = False


@dataclass
class _Layout:
    items: list = field(default_factory=list)  # str (verbatim) or _Unit, in order


class TextTranslator:
    """Translates texts with an open backend (see the module doc). `on_warning(text_idx, msg)`
    hears about pieces passed through; by default they are logged. `raw_first=False` sends every
    piece with spans as sentinels at once (the earlier behaviour, kept for the measurement in
    bench/protection_bench.py)."""

    def __init__(self, backend: Backend, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: Sampling = GREEDY,
                 protect: bool = True, segment_chars: int = DEFAULT_SEGMENT_CHARS, batch_size: int = DEFAULT_BATCH_SIZE,
                 on_warning: Warn | None = None, raw_first: bool = True):
        if max_new_tokens < 1 or segment_chars < 1 or batch_size < 1:
            raise EdgeError("max_new_tokens, segment_chars and batch_size must be >= 1")
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.protect = protect
        self.raw_first = raw_first
        self.segment_chars = segment_chars
        self.batch_size = batch_size
        self.on_warning = on_warning or (lambda idx, msg: logger.warning("text %d: %s", idx + 1, msg))
        self.stats = TranslateStats()

    # -- layout --------------------------------------------------------------------------------
    def _fits(self, text: str, src: Language, tgt: Language) -> bool:
        n_source = len(self.backend.tokenize(text))
        n_prompt = len(self.backend.prompt_ids(text, src, tgt))
        return n_prompt + generation_budget(n_source, self.max_new_tokens) <= self.backend.n_ctx

    def _layout(self, text_idx: int, text: str, src: Language, tgt: Language) -> _Layout:
        layout = _Layout()
        lines = text.split("\n")
        for line_idx, line in enumerate(lines):
            if line_idx:
                layout.items.append("\n")
            n_units = 0
            for is_text, run in split_separators(line):
                if not is_text or not has_letters(run):
                    layout.items.append(run)
                    continue
                for kind, piece in pieces(run, src.language, lambda s: self._fits(s, src, tgt), self.segment_chars):
                    if kind is True:
                        layout.items.append(_Unit(text_idx, piece))
                        n_units += 1
                    else:
                        layout.items.append(piece)
                    if kind is None:
                        self.stats.passed_through += 1
                        where = f"line {line_idx + 1}: " if len(lines) > 1 else ""
                        self.on_warning(text_idx, f"{where}a piece of {len(piece)} characters without a place to cut it "
                                                  f"does not fit the model's context; copied untranslated")
            self.stats.split_lines += n_units > 1
        return layout

    # -- translation ---------------------------------------------------------------------------
    def _generate(self, sources: list[str], src: Language, tgt: Language) -> list[tuple[str, bool] | EdgeError]:
        """(translation, hit_limit) per source, or the error of a source that failed."""
        results: list = []
        for start in range(0, len(sources), self.batch_size):
            chunk = sources[start:start + self.batch_size]
            prompts, budgets = [], []
            for text in chunk:
                prompt = self.backend.prompt_ids(text, src, tgt)
                budget = generation_budget(len(self.backend.tokenize(text)), self.max_new_tokens)
                prompts.append(prompt)
                budgets.append(max(1, min(budget, self.backend.n_ctx - len(prompt))))
            try:
                outputs = self.backend.generate_batch(prompts, budgets, self.sampling)
            except Exception:  # one bad piece must not take the batch down: retry one by one
                outputs = []
                for prompt, budget in zip(prompts, budgets):
                    try:
                        outputs.append(self.backend.generate_batch([prompt], [budget], self.sampling)[0])
                    except Exception as exc:  # noqa: BLE001 - reported per piece, never a traceback
                        outputs.append(exc if isinstance(exc, EdgeError) else EdgeError(f"{type(exc).__name__}: {exc}"))
            for ids, budget in zip(outputs, budgets):
                if isinstance(ids, EdgeError):
                    results.append(ids)
                    continue
                self.stats.new_tokens += len(ids)
                results.append((self.backend.detokenize(ids).strip(), len(ids) >= budget))
        return results

    def _translate_units(self, units: list[_Unit], src: Language, tgt: Language) -> None:
        for unit in units:
            unit.protected = protect(unit.source) if self.protect else None
            if unit.protected is not None and unit.protected.changed:
                self.stats.protected_pieces += 1
                self.stats.protected_spans += len(unit.protected.spans)
                self.stats.accelerators += unit.protected.accelerator is not None
        lost: list[_Unit] = []
        if not self.raw_first:
            lost = [u for u in units if u.protected is not None and u.protected.changed]
            units = [u for u in units if u.protected is None or not u.protected.changed]
        for unit, result in zip(units, self._generate([u.source for u in units], src, tgt)):
            if self._failed(unit, result):
                continue
            text, unit.hit_limit = result
            if unit.protected is not None and unit.protected.changed and spans_kept(unit.source, text):
                lost.append(unit)
                continue
            self.stats.hit_limit += unit.hit_limit
            unit.out = text
        if lost:
            self.stats.sentinel_retries += len(lost) if self.raw_first else 0
            self._translate_protected(lost, src, tgt)

    def _failed(self, unit: _Unit, result) -> bool:
        if not isinstance(result, EdgeError):
            return False
        self.stats.failed += 1
        self.on_warning(unit.text_idx, f"could not translate {unit.source[:40]!r} ({result}); copied untranslated")
        unit.out = unit.source
        return True

    def _translate_protected(self, units: list[_Unit], src: Language, tgt: Language) -> None:
        """Translate with sentinels and restore them; lost or repeated ones: translate around."""
        retry: list[_Unit] = []
        for unit, result in zip(units, self._generate([u.protected.text for u in units], src, tgt)):
            if self._failed(unit, result):
                continue
            text, unit.hit_limit = result
            self.stats.hit_limit += unit.hit_limit
            restored = restore(unit.protected, text)
            out = None if restored is None else put_accelerator(unit.protected, restored)
            # a sentinel glued to a neighbour no longer reads as its span ("%" + "%1" is "%%1")
            if out is None or spans_kept(unit.source, out):
                retry.append(unit)
            else:
                unit.out = out
        if retry:
            self.stats.sentinel_fallbacks += len(retry)
            self._translate_around(retry, src, tgt)

    def _translate_around(self, units: list[_Unit], src: Language, tgt: Language) -> None:
        """Fallback: translate the text between the protected spans, join with the spans."""
        wanted: list[str] = []
        for unit in units:
            wanted += [chunk.strip() for chunk in unit.protected.chunks if has_letters(chunk)]
        translated = iter(self._generate(wanted, src, tgt) if wanted else [])
        for unit in units:
            chunks = []
            for chunk in unit.protected.chunks:
                if not has_letters(chunk):
                    chunks.append(chunk)
                    continue
                result = next(translated)
                core = chunk.strip()
                text = core if isinstance(result, EdgeError) else result[0]
                lead, trail = chunk[:len(chunk) - len(chunk.lstrip())], chunk[len(chunk.rstrip()):]
                chunks.append(lead + text + trail)
            unit.out = put_accelerator(unit.protected, join_around(unit.protected, chunks))

    def translate_texts(self, texts: Sequence[str], src: str | Language, tgt: str | Language) -> list[str]:
        """Translations of `texts`, each with the line structure of its source."""
        source, target = parse_language(src), parse_language(tgt)
        layouts = [self._layout(i, text, source, target) for i, text in enumerate(texts)]
        units = [item for layout in layouts for item in layout.items if isinstance(item, _Unit)]
        self.stats.texts += len(texts)
        self.stats.pieces += len(units)
        self._translate_units(units, source, target)
        return ["".join(item.out if isinstance(item, _Unit) else item for item in layout.items) for layout in layouts]

    def translate_detailed(self, text: str, src: str | Language, tgt: str | Language) -> dict:
        """One text with what happened to it: {"hyp", "pieces", "hit_limit", "passed_through",
        "sentinel_retries", "sentinel_fallbacks", "new_tokens"} (what `packager verify` records per segment)."""
        before = TranslateStats(**self.stats.as_dict())
        hyp = self.translate_texts([text], src, tgt)[0]
        after = self.stats
        return {"hyp": hyp, "pieces": after.pieces - before.pieces, "hit_limit": after.hit_limit > before.hit_limit,
                "passed_through": after.passed_through - before.passed_through,
                "sentinel_retries": after.sentinel_retries - before.sentinel_retries,
                "sentinel_fallbacks": after.sentinel_fallbacks - before.sentinel_fallbacks,
                "new_tokens": after.new_tokens - before.new_tokens}


class Translator:
    """A bundle (or export, or model file) opened for translation. `src`/`tgt` set defaults for
    `translate` and `translate_po`. A bundle is checked first (manifest digest, direction when
    given, sha256 of every file). Options: see `TextTranslator`; other keyword arguments go to
    the backend (e.g. `n_ctx`; `max_batch` defaults to `batch_size`)."""

    def __init__(self, model: str | os.PathLike, threads: int | None = None, *, src: str | None = None,
                 tgt: str | None = None, protect: bool = True, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 batch_size: int = DEFAULT_BATCH_SIZE, segment_chars: int = DEFAULT_SEGMENT_CHARS,
                 sampling: Sampling = GREEDY, on_warning: Warn | None = None, **backend_options):
        from runtime.bundle import _extract, _read_manifest, Bundle, is_bundle

        self.src = parse_language(src) if src else None
        self.tgt = parse_language(tgt) if tgt else None
        self.bundle = None
        backend_options.setdefault("max_batch", batch_size)
        if is_bundle(model):
            path = Path(model)
            root = _extract(path, None) if path.is_file() else path
            self.bundle = Bundle(root, _read_manifest(root))
            if self.src and self.tgt:
                self.bundle.check_direction(self.src, self.tgt)  # before hashing gigabytes
            self.bundle.verify_files()
            backend = self.bundle.open(n_threads=threads, **backend_options)
        else:
            from runtime.backends import open_backend

            backend = open_backend(model, n_threads=threads, **backend_options)
        self.backend = backend
        self.core = TextTranslator(backend, max_new_tokens=max_new_tokens, sampling=sampling, protect=protect,
                                   segment_chars=segment_chars, batch_size=batch_size, on_warning=on_warning)

    @property
    def stats(self) -> TranslateStats:
        return self.core.stats

    def _direction(self, src, tgt) -> tuple[Language, Language]:
        source = parse_language(src) if src else self.src
        target = parse_language(tgt) if tgt else self.tgt
        if source is None or target is None:
            raise EdgeError("no translation direction: pass src= and tgt= (to Translator or to this call)")
        if self.bundle is not None and self.bundle.manifest.directions:
            self.bundle.check_direction(source, target)
        return source, target

    def translate(self, texts: str | Sequence[str], src: str | None = None, tgt: str | None = None) -> list[str] | str:
        """Translations of a list of strings (or of one string), line structure kept."""
        source, target = self._direction(src, tgt)
        if isinstance(texts, str):
            return self.core.translate_texts([texts], source, target)[0]
        return self.core.translate_texts(list(texts), source, target)

    def translate_po(self, catalog: str | os.PathLike, out: str | os.PathLike | None = None, *, src: str | None = None,
                     tgt: str | None = None, overwrite: bool = False) -> dict:
        """Fill the empty msgstr of a gettext catalog (see runtime.po); writes `out` atomically
        (default: in place) and returns counts."""
        from runtime.po import translate_catalog

        source, target = self._direction(src, tgt)
        return translate_catalog(self.core, catalog, out if out is not None else catalog, source, target, overwrite=overwrite)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Translator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
