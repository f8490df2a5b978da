"""Cutting a line of text into pieces a model can translate, and nothing else: the pieces and
the separators between them join back to the line exactly.

- Separators (kept verbatim, never translated): leading/trailing white space, control
  characters (NUL, tabs, lone CR, ...), bidi controls and byte order marks.
- Sentences: `sentencex` (rule-based, compiled, no model files; Wikimedia's segmenter with
  abbreviation lists for en/de/fr/es/ru/ja/zh and ~300 other languages). 0.6 ms for a
  100,000-character line, where pysbd 0.3.4 took 15 s.
- A sentence still too long is cut at a clause mark (, ; : and their CJK forms) or a space
  near its middle, recursively, by the caller's `fits` test.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069\ufeff\t"
# a run of separator characters, with the white space around it
SEPARATOR_RE = re.compile(rf"\s*[{_CONTROL}][{_CONTROL}\s]*")
_CLAUSE_BREAK = re.compile(r"(?<=[,;:])\s+|(?<=[，；：、。！？])")
_SPACE_BREAK = re.compile(r"\s+")


def has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def split_separators(line: str) -> list[tuple[bool, str]]:
    """(is_text, run) pairs covering `line`: text runs have no separator inside and no white
    space at either end."""
    runs: list[tuple[bool, str]] = []
    position = 0
    for match in SEPARATOR_RE.finditer(line):
        runs += _strip_runs(line[position:match.start()])
        runs.append((False, match.group(0)))
        position = match.end()
    runs += _strip_runs(line[position:])
    return [run for run in runs if run[1]]


def _strip_runs(text: str) -> list[tuple[bool, str]]:
    core = text.strip()
    if not core:
        return [(False, text)]
    start = text.index(core)
    return [(False, text[:start]), (True, core), (False, text[start + len(core):])]


def sentences(text: str, language: str) -> list[str]:
    """Sentences of `text` (each with its trailing white space); they join back to `text`."""
    try:
        import sentencex

        found = list(sentencex.segment(language, text))
    except Exception as exc:  # an unknown language code or a segmenter bug: one piece
        logger.debug("sentencex failed on %r: %s", text[:40], exc)
        return [text]
    if "".join(found) == text:
        return [s for s in found if s]
    logger.debug("sentencex changed the white space of %r: cut by clauses instead", text[:40])
    return [text]


def halves(text: str) -> tuple[str, str] | None:
    """`text` cut in two at the clause mark (else the space) closest to its middle, or None."""
    for pattern in (_CLAUSE_BREAK, _SPACE_BREAK):
        cuts = [m.end() for m in pattern.finditer(text) if 0 < m.start() and m.end() < len(text)]
        if cuts:
            cut = min(cuts, key=lambda c: abs(c - len(text) / 2))
            return text[:cut], text[cut:]
    return None


def pieces(text: str, language: str, fits: Callable[[str], bool], max_chars: int) -> Iterator[tuple[bool, str]]:
    """(translate, run) pairs covering a text run: sentences when the run is longer than
    `max_chars` or does not `fit`, cut further while a piece does not fit. `translate` is True
    for a piece to translate, False for a separator or a piece without letters, None for a
    piece that cannot be cut and does not fit (the caller passes it through and warns)."""
    if len(text) <= max_chars and fits(text):
        yield True, text
        return
    parts = sentences(text, language) if len(text) > 1 else [text]
    for part in parts:
        yield from _runs(part, fits, max_chars)


def _runs(text: str, fits: Callable[[str], bool], max_chars: int) -> Iterator[tuple[bool | None, str]]:
    """The white space around `text` and a run without letters pass through; the rest is cut until it fits."""
    for is_text, run in _strip_runs(text):
        if is_text and has_letters(run):
            yield from _cut(run, fits, max_chars)
        elif run:  # a text run is never empty: only empty white space is skipped
            yield False, run


def _cut(text: str, fits: Callable[[str], bool], max_chars: int) -> Iterator[tuple[bool | None, str]]:
    if len(text) <= max_chars and fits(text):
        yield True, text
        return
    split = halves(text)
    if split is None:
        yield None, text  # cannot be cut: the caller passes it through and warns
        return
    for half in split:
        yield from _runs(half, fits, max_chars)
