"""Placeholder and markup protection: what a UI string must keep verbatim through translation.

`protect(text)` finds the spans a translation must not touch and replaces each with a numbered
sentinel (`%1`, `%2`, ...: of the forms tried on the default model, the one it copies most
reliably); `restore(protected, output)` puts the originals back, or returns None when a sentinel
is missing, duplicated or unknown (the caller then translates the text around the spans and
joins the pieces with the spans in source order: `Protected.chunks`).

Protected kinds (`KINDS`):
- `printf`: printf / Python / gcc / LibreOffice placeholders (`%s`, `%1$d`, `%(name)s`, `%PRODUCTNAME`) and
  one-letter codes (gcc's `%D`, gfortran's `%L`, strftime's `%H`, glibc's `%m`);
- `qt`: Qt / LibreOffice numbered placeholders (`%1`), `$(ARG1)`, `${name}`;
- `brace`: Python / .NET brace fields (`{0}`, `{name}`, `{0:d}`);
- `icu`: ICU arguments (`{n, number}`) and the skeleton of plural/select messages
  (`{count, plural, one {` ... `} other {` ... `}` and `#`): the sub-messages stay translatable;
- `tag`: XML/HTML tags (markup tags by name, any tag with attributes, self-closing tags);
- `entity`: character entities (`&amp;`, `&#160;`);
- `escape`: backslash escapes written out in the text (`\\n`, `\\t`, `\\"`);
- `emoji`: emoji and pictographs (with their modifiers and joiners).
UI accelerators (`&File`, `_File`) are not replaced by a sentinel (that would split the word):
the marker is taken out before translation and put back before the same letter of the
translation (case-insensitive), else before its first letter, or as `(&F)` after a CJK text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# -- the patterns (also what packager.quality counts as lost placeholders) ---------------------
# Order matters: the first alternative that matches at a position wins.
PLACEHOLDER_RE = re.compile(
    r"""
      %\([A-Za-z_][A-Za-z0-9_]*\)[-+\#0]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]   # python %(name)s
    | %<[A-Za-z0-9_]+>                                                     # gettext %<PRIu64>
    | %(?:\d+\$)?q[+\#]*[A-Za-z]                                           # gcc %qs %q#T %2$qD
    | %(?:\d+\$)?[+\#]+[A-Z]                                               # gcc %+#D
    | %[A-Z][A-Z0-9_]{2,}%?                                                # LibreOffice %PRODUCTNAME
    | %(?:\d+\$)?[-+\#0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?
        (?:hh|ll|I64|I32|h|l|L|q|j|z|t|I)?[diouxXeEfFgGaAcCsSpn]          # printf %s %-5d %1$s %lu
    | %[<>']                                                               # gcc quoting %< %> %'
    | %[A-Za-z](?![A-Za-z0-9])                        # one-letter codes: gcc %D %T %K, gfortran %L, strftime %H %Y, %m
    | %\d{1,2}                                                             # Qt / LibreOffice %1
    | \$\([A-Za-z0-9_]+\)                                                  # $(ARG1)
    | \$\{[A-Za-z0-9_]+\}                                                  # ${name}
    | \{[A-Za-z0-9_]*(?::[^{}\s]*)?\}                                      # {0} {name} {} {0:d}
    """,
    re.VERBOSE,
)
# Tags of HTML / Pango / LibreOffice help markup; other <words> are often translated text
# ("<file>" -> "<Datei>") and are protected only when they carry attributes or self-close.
MARKUP_TAGS = frozenset(
    "a abbr ahelp b big bookmark_value br caseinline code defaultinline div em emph font h1 h2 h3 "
    "h4 h5 h6 i img item kbd li link menuitem ol p pre s small span strong sub sup switchinline "
    "tt u ul variable".split()
)
TAG_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9_:.-]*)(\s[^<>]*)?(/?)>")
ENTITY_RE = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
ESCAPE_RE = re.compile(r"\\[nrt\"'\\]")
ICU_ARG_RE = re.compile(r"\{\s*[A-Za-z0-9_]+\s*,\s*(?:number|date|time|spellout|ordinal|duration)\s*(?:,[^{}]*)?\}")
_ICU_START = re.compile(r"\{\s*[A-Za-z0-9_]+\s*,\s*(?:plural|selectordinal|select)\s*,\s*(?:offset:\d+\s*)?")
_ICU_SELECTOR = re.compile(r"\s*(=\d+|[A-Za-z0-9_-]+)\s*\{")
_EMOJI = "[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u231A-\u23FF]"
EMOJI_RE = re.compile(f"{_EMOJI}[\uFE0F\U0001F3FB-\U0001F3FF]*(?:\u200D{_EMOJI}[\uFE0F\U0001F3FB-\U0001F3FF]*)*")
# accelerators: one marker before a letter, at the start or after a space ("_File", "Save &As")
_ACCEL_RE = re.compile(r"(?:(?<=\s)|^)([&_])(?=([^\W\d_]))")
SENTINEL = "%{index}"
_SENTINEL_RE = re.compile(r"%(\d+)")

KINDS = ("printf", "qt", "brace", "icu", "tag", "entity", "escape", "emoji", "accelerator")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


def _placeholder_kind(token: str) -> str:
    if token.startswith("{"):
        return "brace"
    if token.startswith("$") or re.fullmatch(r"%\d{1,2}", token):
        return "qt"
    return "printf"


def _icu_skeletons(text: str) -> list[Span]:
    """The fixed parts of ICU plural/select messages; none for a message that does not parse."""
    spans: list[Span] = []
    for start in re.finditer(r"\{", text):
        head = _ICU_START.match(text, start.start())
        if head is None:
            continue
        found, pos, open_at = [], head.end(), start.start()
        while True:
            selector = _ICU_SELECTOR.match(text, pos)
            if selector is None:
                found = []
                break
            found.append(Span(open_at, selector.end(), "icu"))
            depth, i = 1, selector.end()
            while i < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if depth:
                found = []
                break
            close = i - 1
            found += [Span(selector.end() + m.start(), selector.end() + m.start() + 1, "icu")
                      for m in re.finditer("#", text[selector.end():close])]
            after = re.compile(r"\s*\}").match(text, close + 1)
            if after is not None:
                found.append(Span(close, after.end(), "icu"))
                break
            open_at, pos = close, close + 1
        spans += found
    return spans


def find_spans(text: str) -> list[Span]:
    """Non-overlapping protected spans of `text`, in order (leftmost, then longest, wins)."""
    candidates: list[Span] = list(_icu_skeletons(text))
    candidates += [Span(m.start(), m.end(), "icu") for m in ICU_ARG_RE.finditer(text)]
    masked = text.replace("%%", "\0\0")  # "%%" is a literal percent sign
    candidates += [Span(m.start(), m.end(), _placeholder_kind(m.group(0))) for m in PLACEHOLDER_RE.finditer(masked)]
    for m in TAG_RE.finditer(text):
        _, name, attributes, selfclosing = m.groups()
        if name.lower() in MARKUP_TAGS or attributes or selfclosing:
            candidates.append(Span(m.start(), m.end(), "tag"))
    candidates += [Span(m.start(), m.end(), "entity") for m in ENTITY_RE.finditer(text)]
    candidates += [Span(m.start(), m.end(), "escape") for m in ESCAPE_RE.finditer(text)]
    candidates += [Span(m.start(), m.end(), "emoji") for m in EMOJI_RE.finditer(text)]
    candidates.sort(key=lambda s: (s.start, -(s.end - s.start)))
    spans, end = [], 0
    for span in candidates:
        if span.start >= end:
            spans.append(span)
            end = span.end
    return spans


def _accelerator(text: str, spans: list[Span]) -> re.Match | None:
    """The one accelerator marker of `text` (None when there is none or more than one)."""
    inside = [m for m in _ACCEL_RE.finditer(text) if not any(s.start <= m.start() < s.end for s in spans)]
    return inside[0] if len(inside) == 1 else None


@dataclass
class Protected:
    """`text` with sentinels; `spans[i]` is the original of sentinel i + 1; `chunks` the text
    between the spans (len(spans) + 1 of them); `accelerator` the marker taken out, if any."""

    original: str
    text: str
    spans: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    accelerator: tuple[str, str] | None = None  # (marker, letter)

    @property
    def changed(self) -> bool:
        return bool(self.spans) or self.accelerator is not None


def protect(text: str) -> Protected:
    original, spans = text, find_spans(text)
    accelerator = None
    match = _accelerator(text, spans)
    if match is not None:
        accelerator = (match.group(1), match.group(2))
        cut = match.start()
        text = text[:cut] + text[cut + 1:]
        spans = [Span(s.start - (s.start > cut), s.end - (s.start > cut), s.kind) for s in spans]
    parts, chunks, previous = [], [], 0
    for index, span in enumerate(spans, 1):
        chunks.append(text[previous:span.start])
        parts += [text[previous:span.start], SENTINEL.format(index=index)]
        previous = span.end
    chunks.append(text[previous:])
    parts.append(text[previous:])
    return Protected(original, "".join(parts), [text[s.start:s.end] for s in spans],
                     [s.kind for s in spans], chunks, accelerator)


def restore(protected: Protected, output: str) -> str | None:
    """`output` with the sentinels replaced by the original spans; None when any sentinel is
    missing, repeated or out of range (the caller falls back)."""
    if not protected.spans:
        return output
    # longest valid number first: with two spans "%25" is sentinel 2 followed by a digit 5
    numbers = "|".join(str(i) for i in range(len(protected.spans), 0, -1))
    pattern = re.compile(f"%({numbers})")
    seen = [int(m.group(1)) for m in pattern.finditer(output)]
    if sorted(seen) != list(range(1, len(protected.spans) + 1)) or len(_SENTINEL_RE.findall(output)) != len(seen):
        return None
    return pattern.sub(lambda m: protected.spans[int(m.group(1)) - 1], output)


def join_around(protected: Protected, translated_chunks: list[str]) -> str:
    """The fallback: translated chunks joined with the spans in source order."""
    out = [translated_chunks[0]]
    for span, chunk in zip(protected.spans, translated_chunks[1:]):
        out += [span, chunk]
    return "".join(out)


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def put_accelerator(protected: Protected, output: str) -> str:
    """Put the accelerator marker of the source back into `output`."""
    if protected.accelerator is None:
        return output
    marker, letter = protected.accelerator
    spans = find_spans(output)
    free = lambda i: not any(s.start <= i < s.end for s in spans)  # noqa: E731
    positions = [i for i, c in enumerate(output) if c == letter and free(i)]
    positions = positions or [i for i, c in enumerate(output) if c.lower() == letter.lower() and free(i)]
    if not positions and _CJK.search(output):
        return f"{output}({marker}{letter.upper()})"
    if not positions:
        positions = [i for i, c in enumerate(output) if c.isalpha() and free(i)]
    if not positions:
        return marker + output
    at = positions[0]
    return output[:at] + marker + output[at:]


def spans_kept(source: str, output: str) -> list[str]:
    """Protected spans of `source` that `output` lacks (with multiplicity), and the accelerator
    marker when the source has one and the output none: [] = everything kept."""
    from collections import Counter

    wanted = Counter(source[s.start:s.end] for s in find_spans(source))
    have = Counter(output[s.start:s.end] for s in find_spans(output))
    missing = sorted((wanted - have).elements())
    match = _accelerator(source, find_spans(source))
    if match is not None and not re.search(re.escape(match.group(1)) + r"[^\W\d_]", output):
        missing.append(match.group(1))
    return missing
