"""`packager bundle`: an exported model + its verify metrics -> a self-describing bundle.

BUNDLE/
  model file(s)          as exported (GGUF, or ONNX + external data)
  tokenizer.json         when the backend needs one (ONNX)
  manifest.json          runtime.schema.BundleManifest: the export config (format, prompt
                         template, quantization, parent fingerprint, plan) plus directions,
                         measured metrics, minimum RAM, data licenses, sha256 of every file
  manifest.sha256        digest of manifest.json (`sha256sum -c` format)

The bundle is assembled in a temporary sibling directory, every file fsynced, then renamed
into place (runtime.atomic.atomic_output): a failure leaves no partial bundle, and a full disk
or an unwritable folder is one error line naming the output. `archive=True` also writes BUNDLE.tar
(deterministic: sorted members, fixed owner and mtime).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tarfile
from pathlib import Path
from typing import Any, Sequence

from packager import __version__
from packager.core.errors import OutputExistsError, PackagerError
from packager.core.provenance import created_utc

logger = logging.getLogger(__name__)

MIN_RAM_MARGIN = 1.10  # headroom over the measured peak
MIB = 1 << 20
CHUNK_BYTES = 4 * MIB
METRIC_KEYS = ("summary", "directions", "footprint", "ratios", "labels")


class BundleBuildError(PackagerError):
    """An export or metrics file that cannot be bundled."""


def _resolve_export(export: str | os.PathLike):
    from runtime.backends import resolve_model
    from runtime.errors import EdgeError
    from runtime.schema import BundleManifest

    try:
        model_file, config = resolve_model(export)
    except EdgeError as exc:
        raise BundleBuildError(str(exc)) from None
    if isinstance(config, BundleManifest):
        raise BundleBuildError(f"{export}: is already a bundle; give the export (FILE.gguf / FILE.onnx or its directory)")
    files = [Path(p) for p in config.model_paths(model_file.parent)]
    # ONNX external data files live beside the model: the config lists them as model files
    if config.tokenizer:
        files.append(model_file.parent / config.tokenizer)
    for path in files:
        if not path.is_file():
            raise BundleBuildError(f"{path}: listed in the export config of {model_file.name} but missing; re-export the model")
    return model_file, config, files


def _check_metrics(metrics: dict, metrics_path: str, files: Sequence[Path], base: Path) -> None:
    measured = metrics.get("model", {}).get("files", {})
    for path in files:
        name = path.relative_to(base).as_posix()
        entry = measured.get(path.name) or measured.get(name)
        if entry is None:
            raise BundleBuildError(f"{metrics_path}: was not measured on {name}; run `packager verify` on this export")
        if entry.get("bytes") != path.stat().st_size:
            raise BundleBuildError(f"{metrics_path}: was measured on another {name} (size differs); re-run `packager verify`")


def _directions(requested: str | Sequence[str] | None, metrics: dict, metrics_path: str) -> list[str]:
    from packager.verify import parse_pair_list
    from runtime.languages import parse_pair

    verified = {str(parse_pair(slug)): slug for slug in metrics.get("directions", {})}
    if requested:
        wanted = [str(p) for p in parse_pair_list(requested)]
    else:
        wanted = list(verified)
    if not wanted:
        raise BundleBuildError(f"{metrics_path}: measures no direction; run `packager verify --pairs ...` first")
    unverified = [d for d in wanted if d not in verified]
    if unverified:
        raise BundleBuildError(f"{metrics_path}: direction(s) {', '.join(unverified)} were not verified (measured: "
                               f"{', '.join(verified) or 'none'}); run `packager verify --pairs` with them")
    return wanted


def _languages(directions: Sequence[str], config_languages: Sequence[str]) -> list[str]:
    from runtime.languages import parse_pair

    codes: list[str] = []
    for item in directions:
        pair = parse_pair(item)
        for code in (pair.src.code, pair.tgt.code):
            if code not in codes:
                codes.append(code)
    for code in config_languages:
        if code not in codes:
            codes.append(code)
    return codes


def stock_client_note(template: str, directions: Sequence[str]) -> str | None:
    """A warning when the chat template's default direction (what stock chat clients get with
    messages only, runtime.prompt.default_direction) is not one the bundle offers."""
    from runtime.errors import LanguageError
    from runtime.languages import parse_pair
    from runtime.prompt import default_direction

    default = default_direction(template)
    if default is None:
        return None
    try:
        default = str(parse_pair(default))
    except LanguageError:
        return f"the chat template's default direction {default!r} is not a direction; stock chat clients need a system message such as {directions[0]!r}"
    if default in directions:
        return None
    return (f"stock chat clients (llama-server, Ollama) default to {default}, which this bundle does not offer; "
            f"they must send a system message such as {directions[0]!r} (the GGUF takes its default from the plan's first pair)")


def min_ram_bytes(metrics: dict) -> int:
    """Measured peak RSS of the runtime process (interpreter + runtime + model at the verify
    settings) plus 10%, rounded up to a MiB."""
    peak = metrics.get("footprint", {}).get("peak_rss_bytes") or 0
    return int(math.ceil(peak * MIN_RAM_MARGIN / MIB) * MIB)


def data_licenses(metrics: dict, calibration_data: Sequence[str | os.PathLike] = ()) -> list[dict]:
    """Licenses of the data behind the bundle: evaluation records (from the metrics) and,
    when given, the calibration JSONL files (harvest records carry package and license)."""
    licenses = [dict(item) for item in metrics.get("test", {}).get("licenses", [])]
    counts: dict[tuple[str, str], int] = {}
    for path in calibration_data:
        path = Path(path)
        if path.suffix != ".jsonl":
            licenses.append({"package": path.name, "license": "unknown (not a harvest JSONL)", "use": "calibration"})
            continue
        try:
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        record = json.loads(line)
                        key = (str(record.get("package", "")), str(record.get("license", "unknown")))
                        counts[key] = counts.get(key, 0) + 1
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise BundleBuildError(f"{path}: unreadable calibration data ({exc}); give the harvest JSONL used by calibrate") from None
    licenses += [{"package": p, "license": lic, "records": n, "use": "calibration"} for (p, lic), n in sorted(counts.items())]
    return licenses


def _copy_hashed(src: Path, dst: Path, progress=None, task=None) -> dict[str, Any]:
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:  # fsynced with the whole bundle
        while chunk := fin.read(CHUNK_BYTES):
            digest.update(chunk)
            fout.write(chunk)
            if progress is not None:
                progress.advance(task, len(chunk))
    os.chmod(dst, 0o644)
    return {"sha256": digest.hexdigest(), "bytes": dst.stat().st_size}


def _write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)  # fsynced with the whole bundle
    os.chmod(path, 0o644)


def _metrics_summary(metrics: dict) -> dict:
    """What the manifest keeps of the metrics: scores, errors, footprint, ratios (no segments)."""
    summary = {key: metrics[key] for key in METRIC_KEYS if key in metrics}
    test = metrics.get("test", {})
    summary["test"] = {k: test.get(k) for k in ("file", "sha256", "limit", "pairs", "n", "generation")}
    if "parent" in metrics:
        parent = metrics["parent"]
        summary["parent"] = {"model": {k: parent["model"].get(k) for k in ("path", "format", "quantization", "file_bytes")},
                             "summary": parent.get("summary"), "footprint": parent.get("footprint")}
    return summary


def make_bundle(export: str | os.PathLike, metrics_path: str | os.PathLike, out: str | os.PathLike, *,
                directions: str | Sequence[str] | None = None, calibration_data: Sequence[str | os.PathLike] = (),
                archive: bool = False, force: bool = False, progress: bool = False) -> Path:
    """Assemble the bundle directory `out` (and `out`.tar with `archive`); returns `out`."""
    from packager.verify import load_metrics
    from runtime.atomic import atomic_output
    from runtime.bundle import ARCHIVE_SUFFIX, MANIFEST_DIGEST_NAME, MANIFEST_NAME, digest_line
    from runtime.errors import EdgeError
    from runtime.schema import BundleManifest

    out = Path(out)
    model_file, config, files = _resolve_export(export)
    metrics = load_metrics(metrics_path)
    base = model_file.parent
    _check_metrics(metrics, str(metrics_path), files, base)
    wanted = _directions(directions, metrics, str(metrics_path))
    note = stock_client_note(config.prompt_template, wanted) if config.format == "gguf" else None
    if note:
        logger.warning("bundle %s: %s", out, note)
    archive_path = out.with_name(out.name + ARCHIVE_SUFFIX)
    for target in [out] + ([archive_path] if archive else []):
        if target.exists() and not force:
            raise OutputExistsError(f"{target}: already exists; choose another --out or pass --force")
    if not out.parent.is_dir():
        raise BundleBuildError(f"{out.parent}: output directory does not exist; create it first")
    names = [path.relative_to(base).as_posix() for path in files]
    if MANIFEST_NAME in names or MANIFEST_DIGEST_NAME in names:
        raise BundleBuildError(f"{export}: a model file is named {MANIFEST_NAME!r}; rename it")

    total = sum(p.stat().st_size for p in files)
    with atomic_output(out, directory=True, needed_bytes=total) as staging:
        bar = _progress(progress, total, f"bundle {out.name}")
        entries = {}
        with bar if bar is not None else contextlib.nullcontext():
            task = bar.tasks[0].id if bar is not None else None
            for path, name in zip(files, names):
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                entries[name] = _copy_hashed(path, staging / name, bar, task)
                measured = metrics["model"]["files"].get(path.name) or metrics["model"]["files"].get(name)
                if measured.get("sha256") != entries[name]["sha256"]:
                    raise BundleBuildError(f"{metrics_path}: was measured on another {name} (sha256 differs); "
                                           f"re-run `packager verify` on this export")
        bundle_provenance = {
            "packager_version": __version__,
            "command": " ".join(sys.argv),
            **created_utc(),  # SOURCE_DATE_EPOCH or nothing: same inputs, same bytes
            "export": str(Path(export)),
            "metrics": str(metrics_path),
            "metrics_sha256": hashlib.sha256(Path(metrics_path).read_bytes()).hexdigest(),
            "parent_model": (metrics.get("parent") or {}).get("model", {}).get("path"),
        }
        try:
            manifest = BundleManifest.from_export(
                config,
                languages=_languages(wanted, config.languages),
                directions=wanted,
                metrics=_metrics_summary(metrics),
                licenses=data_licenses(metrics, calibration_data),
                files=entries,
                min_ram_bytes=min_ram_bytes(metrics),
                provenance={**config.provenance, "bundle": bundle_provenance},
            )
        except EdgeError as exc:
            raise BundleBuildError(f"{export}: {exc}") from None
        raw = (json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        _write_file(staging / MANIFEST_NAME, raw)
        _write_file(staging / MANIFEST_DIGEST_NAME, digest_line(raw).encode("ascii"))
        if archive:
            _write_archive(staging, out.name, archive_path)
    logger.info("bundle: wrote %s (%d files, %.1f MB)", out, len(entries), sum(e["bytes"] for e in entries.values()) / 1e6)
    return out


def _write_archive(staging: Path, name: str, archive_path: Path) -> None:
    """Deterministic tar: sorted members under `name/`, owner 0, mtime 0, mode 0644."""
    from runtime.atomic import atomic_output

    with atomic_output(archive_path) as tmp:
        with tmp.open("wb") as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                    info = tarfile.TarInfo(f"{name}/{path.relative_to(staging).as_posix()}")
                    info.size, info.mtime, info.mode, info.uid, info.gid = path.stat().st_size, 0, 0o644, 0, 0
                    with path.open("rb") as data:
                        tar.addfile(info, data)
    os.chmod(archive_path, 0o644)


def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    bar.add_task(label, total=total)
    return bar

