"""The one language-code parser of the project (a BCP-47 subset) and the direction parser.

A tag is `language[-Script][-REGION]`: language = ISO 639-1 (2 letters) or ISO 639-2/3
(3 letters; mapped to 639-1 when one exists), script = 4 letters, region = 2 letters or
3 digits. `_` is accepted as a separator (gettext style) and case does not matter.

Identity is what a translation model distinguishes: the language plus a script when it is not
the language's usual one. A region only matters through the script it implies (zh-TW means
Traditional Chinese), so zh == zh-Hans == zh-CN == zho, zh-TW == zh-Hant, en-US == en. The
region is kept on the object for display but takes no part in equality.

Directions: "en-de" and "en->de" are one direction; "en<->de" both; lists with commas on
either side expand to every pair: "en->de,fr,es", "de,fr->en", "en<->de,ja".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from runtime.errors import LanguageError

ISO639_1 = frozenset(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy "
    "da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu "
    "hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb "
    "lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om "
    "or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw "
    "ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu".split()
)

# Withdrawn 639-1 codes still seen in old catalogs.
DEPRECATED_1 = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "mo": "ro"}

# ISO 639-2 (B and T) / 639-3 codes of languages that have a 639-1 code. Other 3-letter
# codes (arz, yue, fil, ...) are kept as they are: they are valid 639-3 languages.
ISO639_3_TO_1 = {
    "afr": "af", "amh": "am", "ara": "ar", "aze": "az", "bel": "be", "ben": "bn", "bul": "bg",
    "cat": "ca", "ces": "cs", "cze": "cs", "cmn": "zh", "cym": "cy", "wel": "cy", "dan": "da",
    "deu": "de", "ger": "de", "ell": "el", "gre": "el", "eng": "en", "epo": "eo", "est": "et",
    "eus": "eu", "baq": "eu", "fas": "fa", "per": "fa", "fin": "fi", "fra": "fr", "fre": "fr",
    "gle": "ga", "glg": "gl", "guj": "gu", "heb": "he", "hin": "hi", "hrv": "hr", "hun": "hu",
    "hye": "hy", "arm": "hy", "ind": "id", "isl": "is", "ice": "is", "ita": "it", "jpn": "ja",
    "kat": "ka", "geo": "ka", "kaz": "kk", "khm": "km", "kan": "kn", "kor": "ko", "lao": "lo",
    "lat": "la", "lav": "lv", "lit": "lt", "mal": "ml", "mar": "mr", "mkd": "mk", "mac": "mk",
    "mon": "mn", "msa": "ms", "may": "ms", "mya": "my", "bur": "my", "nep": "ne", "nld": "nl",
    "dut": "nl", "nob": "nb", "nno": "nn", "nor": "no", "pan": "pa", "pol": "pl", "por": "pt",
    "ron": "ro", "rum": "ro", "rus": "ru", "sin": "si", "slk": "sk", "slo": "sk", "slv": "sl",
    "som": "so", "spa": "es", "sqi": "sq", "alb": "sq", "srp": "sr", "swa": "sw", "swe": "sv",
    "tam": "ta", "tel": "te", "tgl": "tl", "tha": "th", "tur": "tr", "ukr": "uk", "urd": "ur",
    "uzb": "uz", "vie": "vi", "xho": "xh", "yor": "yo", "zho": "zh", "chi": "zh", "zul": "zu",
}

# The script a language is written in unless said otherwise (dropped from the canonical tag).
DEFAULT_SCRIPT = {
    **{code: "Latn" for code in (
        "af", "ca", "cs", "cy", "da", "de", "en", "eo", "es", "et", "eu", "fi", "fr", "ga", "gl",
        "hr", "hu", "id", "is", "it", "la", "lt", "lv", "ms", "nb", "nl", "nn", "no", "pl", "pt",
        "ro", "sk", "sl", "so", "sq", "sv", "sw", "tl", "tr", "vi", "xh", "yo", "zu")},
    **{code: "Cyrl" for code in ("be", "bg", "kk", "mk", "ru", "uk")},
    **{code: "Arab" for code in ("ar", "arz", "fa", "ur")},
    **{code: "Deva" for code in ("hi", "mr", "ne")},
    "bn": "Beng", "el": "Grek", "he": "Hebr", "hy": "Armn", "ja": "Jpan", "ka": "Geor",
    "km": "Khmr", "ko": "Kore", "lo": "Laoo", "my": "Mymr", "si": "Sinh", "ta": "Taml",
    "te": "Telu", "th": "Thai", "zh": "Hans", "yue": "Hant",
}

# Regions that decide the script (only where a language is written in two scripts).
REGION_SCRIPT = {
    "zh": {"CN": "Hans", "SG": "Hans", "MY": "Hans", "TW": "Hant", "HK": "Hant", "MO": "Hant"},
}

NAMES = {
    "ar": "Arabic", "arz": "Egyptian Arabic", "bn": "Bengali", "cs": "Czech", "da": "Danish",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "fa": "Persian",
    "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish",
    "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}
SCRIPT_NAMES = {"Hans": "Simplified", "Hant": "Traditional", "Latn": "Latin", "Cyrl": "Cyrillic"}

ACCEPTED = (
    "a language tag is an ISO 639-1 code (2 letters: en, de, ja, zh) or an ISO 639-3 code "
    "(3 letters: deu, arz), optionally followed by a script (4 letters: zh-Hant, sr-Latn) "
    "and/or a region (2 letters or 3 digits: pt-BR, es-419)"
)
DIRECTIONS_ACCEPTED = (
    "write a direction as 'en-de' or 'en->de', both directions as 'en<->de', and several "
    "languages with commas: 'en->de,fr,es', 'de,fr->en', 'en<->de,ja'"
)

_SUBTAG = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Language:
    """A canonical language: `language` (lower case), `script` (title case, None when it is
    the language's default). `region` is informational only (not part of equality)."""

    language: str
    script: str | None = None
    region: str | None = field(default=None, compare=False, hash=False)

    @property
    def code(self) -> str:
        return self.language if self.script is None else f"{self.language}-{self.script}"

    @property
    def name(self) -> str:
        base = NAMES.get(self.language, self.language)
        if self.script is None:
            return base
        return f"{base} ({SCRIPT_NAMES.get(self.script, self.script)})"

    def __str__(self) -> str:
        return self.code


def parse_language(tag: "str | Language") -> Language:
    """Parse a BCP-47-style tag into its canonical `Language`; raises LanguageError."""
    if isinstance(tag, Language):
        return tag
    if not isinstance(tag, str) or not tag.strip():
        raise LanguageError(f"empty language code {tag!r}: {ACCEPTED}")
    text = tag.strip()
    parts = re.split(r"[-_]", text)
    if any(not part or not _SUBTAG.match(part) for part in parts):
        raise LanguageError(f"malformed language code {text!r}: {ACCEPTED}")

    language = parts[0].lower()
    if not language.isalpha() or len(language) not in (2, 3):
        raise LanguageError(f"unknown language {parts[0]!r} in {text!r}: {ACCEPTED}")
    language = DEPRECATED_1.get(language, language)
    if len(language) == 2 and language not in ISO639_1:
        raise LanguageError(f"unknown language {parts[0]!r} in {text!r}: {ACCEPTED}")
    language = ISO639_3_TO_1.get(language, language)

    script = region = None
    rest = parts[1:]
    if rest and len(rest[0]) == 4 and rest[0].isalpha():
        script = rest.pop(0).title()
    if rest and ((len(rest[0]) == 2 and rest[0].isalpha()) or (len(rest[0]) == 3 and rest[0].isdigit())):
        region = rest.pop(0).upper()
    if rest:
        raise LanguageError(f"unsupported subtag {rest[0]!r} in {text!r}: {ACCEPTED}")

    if script is None and region is not None:
        script = REGION_SCRIPT.get(language, {}).get(region)
    if script is not None and DEFAULT_SCRIPT.get(language) == script:
        script = None
    return Language(language, script, region)


def is_language(tag: str) -> bool:
    try:
        parse_language(tag)
    except LanguageError:
        return False
    return True


@dataclass(frozen=True)
class Pair:
    """One translation direction."""

    src: Language
    tgt: Language

    def __post_init__(self) -> None:
        if self.src == self.tgt:
            raise LanguageError(f"source and target are the same language {self.src.code!r}: {DIRECTIONS_ACCEPTED}")

    @property
    def slug(self) -> str:
        """File-name form, e.g. 'en-de' (parse_pair reads it back)."""
        return f"{self.src.code}-{self.tgt.code}"

    def reversed(self) -> "Pair":
        return Pair(self.tgt, self.src)

    def __str__(self) -> str:
        return f"{self.src.code}->{self.tgt.code}"


def _language_list(text: str, spec: str) -> list[Language]:
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise LanguageError(f"empty language in direction {spec!r}: {DIRECTIONS_ACCEPTED}")
    return [parse_language(item) for item in items]


def _split_hyphen_pair(spec: str) -> tuple[Language, Language]:
    """'en-de' or 'zh-Hant-en': the one split where both sides are valid tags."""
    pieces = spec.split("-")
    splits = []
    for cut in range(1, len(pieces)):
        left, right = "-".join(pieces[:cut]), "-".join(pieces[cut:])
        if is_language(left) and is_language(right):
            splits.append((parse_language(left), parse_language(right)))
    if not splits:
        raise LanguageError(f"cannot read direction {spec!r}: {DIRECTIONS_ACCEPTED}")
    if len(splits) > 1:
        options = " or ".join(f"'{a.code}->{b.code}'" for a, b in splits)
        raise LanguageError(f"ambiguous direction {spec!r}: write {options}")
    return splits[0]


def parse_pairs(spec: str) -> list[Pair]:
    """Every direction named by `spec`, in order, without duplicates; raises LanguageError."""
    if not isinstance(spec, str) or not spec.strip():
        raise LanguageError(f"empty direction {spec!r}: {DIRECTIONS_ACCEPTED}")
    text = spec.strip().replace(" ", "")
    pairs: list[Pair] = []
    if "<->" in text:
        left, _, right = text.partition("<->")
        if "<->" in right or "->" in right:
            raise LanguageError(f"cannot read direction {spec!r}: {DIRECTIONS_ACCEPTED}")
        for a in _language_list(left, spec):
            for b in _language_list(right, spec):
                pairs += [Pair(a, b), Pair(b, a)]
    elif "->" in text:
        left, _, right = text.partition("->")
        if "->" in right:
            raise LanguageError(f"cannot read direction {spec!r}: {DIRECTIONS_ACCEPTED}")
        pairs = [Pair(a, b) for a in _language_list(left, spec) for b in _language_list(right, spec)]
    else:
        if "," in text:
            raise LanguageError(f"cannot read direction {spec!r}: {DIRECTIONS_ACCEPTED}")
        pairs = [Pair(*_split_hyphen_pair(text))]
    unique: list[Pair] = []
    for pair in pairs:
        if pair not in unique:
            unique.append(pair)
    return unique


def parse_pair(spec: str) -> Pair:
    """Exactly one direction ('en-de', 'en->de'); raises LanguageError otherwise."""
    pairs = parse_pairs(spec)
    if len(pairs) != 1:
        raise LanguageError(f"{spec!r} names {len(pairs)} directions, expected one such as 'en->de'")
    return pairs[0]


def parse_pair_list(spec: str | Sequence[str]) -> list[Pair]:
    """The directions of a `--pairs` value, in order, without duplicates: 'en-de,en-fr',
    'en->de,fr', 'en<->de', a mix ('en-de,en->fr,es') or a list of such strings. After an
    arrow, comma items that are not a pair are more languages of that arrow. The one grammar of
    every command; raises LanguageError naming the item that cannot be read."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    pairs: list[Pair] = []
    for item in specs:
        groups: list[str] = []
        for token in (t.strip() for t in item.split(",")):
            if not token:
                continue
            if "->" in token or not groups or "->" not in groups[-1]:
                groups.append(token)
                continue
            try:
                parse_pair(token)
                groups.append(token)  # a pair of its own: 'en->de,en-fr'
            except LanguageError:
                groups[-1] += "," + token  # one more language: 'en->de,fr'
        for group in groups:
            found = parse_pairs(group) if "->" in group else [parse_pair(group)]
            pairs += [pair for pair in found if pair not in pairs]
    if not pairs:
        raise LanguageError(f"{spec!r} names no direction; write e.g. en-de,en-fr or en->de,fr")
    return pairs
