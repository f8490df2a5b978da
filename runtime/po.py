"""gettext catalogs: fill the empty `msgstr` of a .po file with machine translations (polib).

- Plural entries get `nplurals` forms from the catalog's `Plural-Forms` header: form 0 is the
  translation of `msgid`, the others of `msgid_plural` (a one-form language gets the plural's);
  a catalog with plural entries and no usable header is refused.
- Every machine translation is marked `fuzzy`, so a translator reviews it before it ships.
- Comments, context, flags, references, previous msgids and obsolete entries are kept as they
  are; an entry that already has a translation is left alone unless `overwrite`.
- Multi-line messages keep their lines (runtime.translator translates line by line).
- The output is written atomically (temporary sibling, fsync, rename): a failure leaves no file.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from runtime.atomic import atomic_write_bytes
from runtime.errors import EdgeError
from runtime.languages import Language

logger = logging.getLogger(__name__)

_NPLURALS = re.compile(r"nplurals\s*=\s*(\d+)")


class CatalogError(EdgeError):
    """A .po file that cannot be read or written."""


def read_catalog(path: str | os.PathLike):
    import polib

    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: .po file not found")
    try:
        return polib.pofile(str(path), wrapwidth=78)
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not readable in its declared charset (byte offset {exc.start}: {exc.reason}); "
                           f"fix the Content-Type charset or the file") from None
    except (OSError, ValueError, LookupError) as exc:
        reason = " ".join(str(exc).split())
        raise CatalogError(f"{path}: not a valid .po file ({reason}); fix it (msgfmt -c shows the details)") from None


def n_plurals(catalog, path) -> int | None:
    header = catalog.metadata.get("Plural-Forms", "")
    match = _NPLURALS.search(header)
    if match is None or not 1 <= int(match.group(1)) <= 6:
        return None
    return int(match.group(1))


def _needs(entry, overwrite: bool) -> bool:
    if entry.obsolete or not entry.msgid:
        return False
    if overwrite:
        return True
    if entry.msgid_plural:
        return not any(entry.msgstr_plural.values())
    return not entry.msgstr


def translate_catalog(core, src_path: str | os.PathLike, out_path: str | os.PathLike, src: Language, tgt: Language,
                      *, overwrite: bool = False) -> dict:
    """Translate the entries of `src_path` that need it with `core` (a TextTranslator) and write
    the catalog to `out_path`. Returns {"entries", "translated", "plural", "kept", "obsolete"}."""
    catalog = read_catalog(src_path)
    todo = [entry for entry in catalog if _needs(entry, overwrite)]
    plural_count = n_plurals(catalog, src_path)
    if plural_count is None and any(entry.msgid_plural for entry in todo):
        raise CatalogError(f"{src_path}: plural entries but no usable Plural-Forms header (e.g. "
                           f"'nplurals=2; plural=(n != 1);'); add the target language's header first")
    texts: list[str] = []
    for entry in todo:
        texts.append(entry.msgid)
        if entry.msgid_plural:
            texts.append(entry.msgid_plural)
    translated = iter(core.translate_texts(texts, src, tgt))
    for entry in todo:
        singular = next(translated)
        if entry.msgid_plural:
            plural = next(translated)
            forms = [plural] if plural_count == 1 else [singular] + [plural] * (plural_count - 1)
            entry.msgstr_plural = dict(enumerate(forms))
        else:
            entry.msgstr = singular
        if "fuzzy" not in entry.flags:
            entry.flags.append("fuzzy")
    encoding = catalog.encoding or "utf-8"
    try:
        data = str(catalog).encode(encoding)
    except (UnicodeEncodeError, LookupError) as exc:
        raise CatalogError(f"{src_path}: translations cannot be written in the catalog's charset {encoding!r} ({exc}); "
                           f"convert it to UTF-8 (msgconv -t UTF-8)") from None
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise CatalogError(f"{out_path}: its directory does not exist")
    atomic_write_bytes(out_path, data if data.endswith(b"\n") else data + b"\n")
    entries = [e for e in catalog if e.msgid and not e.obsolete]
    return {"entries": len(entries), "translated": len(todo), "plural": sum(1 for e in todo if e.msgid_plural),
            "kept": len(entries) - len(todo), "obsolete": len(catalog.obsolete_entries())}
