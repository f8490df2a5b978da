"""Load a bundle made by `packager bundle`: check it, then open its model.

A bundle is a directory (or a `.tar` of one) holding the model file(s), the tokenizer when
the backend needs one, `manifest.json` (runtime.schema.BundleManifest) and
`manifest.sha256` (`sha256sum` format, the digest of manifest.json). Loading checks, in
order: the manifest digest (an edited manifest is refused), the schema, that every listed
file exists with its size and sha256 (a changed or truncated model is refused), and, when
a direction is asked for, that the bundle covers it. This guards against corruption and
accidental edits; it is not a signature (whoever rewrites both files passes).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from runtime.errors import EdgeError, SchemaError
from runtime.file_hash import file_sha256
from runtime.languages import Language, Pair, parse_language
from runtime.schema import BundleManifest

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_DIGEST_NAME = "manifest.sha256"
ARCHIVE_SUFFIX = ".tar"


class BundleError(EdgeError):
    """A bundle that is missing, incomplete, tampered with or corrupt."""


class DirectionError(BundleError):
    """A translation direction the bundle does not cover."""


def digest_line(manifest_bytes: bytes) -> str:
    """The content of manifest.sha256 for these manifest bytes."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST_NAME}\n"


def is_bundle(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path.is_dir() and (path / MANIFEST_NAME).is_file()) or (path.is_file() and path.name.endswith(ARCHIVE_SUFFIX))


@dataclass
class Bundle:
    root: Path
    manifest: BundleManifest

    @property
    def directions(self) -> list[Pair]:
        from runtime.languages import parse_pair

        return [parse_pair(item) for item in self.manifest.directions]

    def describe_directions(self) -> str:
        return ", ".join(self.manifest.directions) or "none"

    def check_direction(self, src: str | Language, tgt: str | Language) -> Pair:
        """The Pair for src->tgt; DirectionError listing what the bundle covers otherwise."""
        pair = Pair(parse_language(src), parse_language(tgt))
        if pair not in self.directions:
            raise DirectionError(
                f"{self.root}: this bundle translates {self.describe_directions()}, not {pair}; "
                f"use a bundle built for {pair} (packager build) or one of the directions listed"
            )
        return pair

    def verify_files(self) -> None:
        """Every file of the manifest is present with its size and sha256."""
        for name, entry in sorted(self.manifest.files.items()):
            path = self.root / PurePosixPath(name)
            if not path.is_file():
                raise BundleError(f"{path}: missing from the bundle (listed in {MANIFEST_NAME}); the bundle is incomplete, rebuild or re-copy it")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise BundleError(f"{path}: {size} bytes, the manifest says {entry['bytes']}; the file is truncated or "
                                  f"replaced, rebuild or re-copy the bundle")
            if file_sha256(path) != entry["sha256"]:
                raise BundleError(f"{path}: sha256 does not match the manifest; the file was modified or corrupted, "
                                  f"rebuild or re-copy the bundle")

    def model_file(self) -> Path:
        return self.root / self.manifest.model_files[0]

    def open(self, n_threads: int | None = None, **options):
        """The loaded backend (llama.cpp or ONNX Runtime, by the manifest's format)."""
        from runtime.backends import backend_class

        return backend_class(self.manifest.format).load(self.model_file(), self.manifest, n_threads=n_threads, **options)


def _read_manifest(root: Path) -> BundleManifest:
    manifest_path = root / MANIFEST_NAME
    digest_path = root / MANIFEST_DIGEST_NAME
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{root}: not a bundle ({MANIFEST_NAME} is missing); make one with `packager bundle`") from None
    try:
        recorded = digest_path.read_text(encoding="ascii").split()[0]
    except (FileNotFoundError, IndexError, UnicodeDecodeError):
        raise BundleError(f"{digest_path}: missing or unreadable; the bundle is incomplete, rebuild or re-copy it") from None
    if hashlib.sha256(raw).hexdigest() != recorded:
        raise BundleError(f"{manifest_path}: does not match {MANIFEST_DIGEST_NAME} (the manifest was edited or corrupted); "
                          f"rebuild the bundle with `packager bundle`")
    import json

    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{manifest_path}: not valid JSON ({exc})") from None
    return BundleManifest.from_dict(data, source=str(manifest_path))


def _extract(archive: Path, cache_dir: Path | None) -> Path:
    """Unpack a bundle archive once into a cache directory keyed by its sha256."""
    digest = file_sha256(archive)
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-translate"
    target = base / digest[:32]
    if target.is_dir():
        return _bundle_root(target, archive)
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".{digest[:32]}.{os.getpid()}.tmp"
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if not (member.isfile() or member.isdir()) or path.is_absolute() or ".." in path.parts:
                    raise BundleError(f"{archive}: unsafe archive member {member.name!r}; not a bundle made by `packager bundle`")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")
            else:  # Python < 3.10.12: members were checked above
                tar.extractall(staging)
        os.replace(staging, target)
    except (tarfile.TarError, OSError) as exc:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        reason = "not a tar archive, or truncated" if isinstance(exc, tarfile.ReadError) else " ".join(str(exc).split())
        raise BundleError(f"{archive}: cannot unpack the bundle archive ({reason}); re-copy it") from None
    return _bundle_root(target, archive)


def _bundle_root(extracted: Path, archive: Path) -> Path:
    if (extracted / MANIFEST_NAME).is_file():
        return extracted
    subdirs = [p for p in extracted.iterdir() if p.is_dir() and (p / MANIFEST_NAME).is_file()]
    if len(subdirs) != 1:
        raise BundleError(f"{archive}: the archive holds no bundle ({MANIFEST_NAME} not found)")
    return subdirs[0]


def load_bundle(path: str | os.PathLike, *, verify: bool = True, cache_dir: Path | None = None) -> Bundle:
    """Read and check a bundle directory or `.tar` archive (see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: not found; give a bundle directory or archive made by `packager bundle`")
    if path.is_file() and not path.name.endswith(ARCHIVE_SUFFIX):
        raise BundleError(f"{path}: not a bundle archive (expected a {ARCHIVE_SUFFIX} file or a directory)")
    root = _extract(path, cache_dir) if path.is_file() else path
    bundle = Bundle(root, _read_manifest(root))
    if verify:
        bundle.verify_files()
    return bundle


def open_translator(path: str | os.PathLike, src: str | Language, tgt: str | Language, n_threads: int | None = None, **options):
    """A backend for src->tgt: a bundle is checked (digest, files, direction) first; any
    other path (export directory, config, model file) opens as runtime.backends does."""
    if is_bundle(path):
        path = Path(path)
        root = _extract(path, None) if path.is_file() else path
        bundle = Bundle(root, _read_manifest(root))
        bundle.check_direction(src, tgt)  # before hashing gigabytes
        bundle.verify_files()
        return bundle.open(n_threads=n_threads, **options)
    from runtime.backends import open_backend

    return open_backend(path, n_threads=n_threads, **options)
