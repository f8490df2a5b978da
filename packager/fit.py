"""`packager fit`: the best bundle for each direction that fits a device's RAM and storage.

Candidates come from a directory of bundles (each `*/manifest.json`, or `*.tar` archives whose
manifest is read without unpacking) or from a `packager report` report.json (its rows).

- Storage: the bytes of every file the manifest lists (what is copied to the device).
- RAM: the manifest's `min_ram_bytes` (peak RSS of the runtime measured by `packager verify`,
  plus 10%) when present. Without a measurement (0, or a report row without RSS), an estimate
  from the model file: `estimate_ram_bytes` (see there), marked "estimated" in the output.
- Best: the highest chrF++ for that direction (the manifest's verify metrics). Ties (equal to
  0.01 chrF++, the precision the metrics are rounded to) go to the smaller RAM need, then to
  the smaller storage, then to the name (so the choice is deterministic). A candidate without
  a chrF++ for the direction ranks after every measured one.
"""
from __future__ import annotations

import json
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from packager.core.errors import PackagerError

RAM_MARGIN = 1.10  # as packager.bundle.MIN_RAM_MARGIN: headroom over a measured peak
GIB, MIB = 1 << 30, 1 << 20

# Budgets are what the translator may use, not the device's total: the OS, a desktop or the
# phone's other apps keep the rest. Threads: big cores the runtime should use.
PROFILES: dict[str, dict[str, Any]] = {
    "pi4-2gb": {"ram_bytes": int(1.5 * GIB), "storage_bytes": 2 * GIB, "threads": 4,
                "note": "Raspberry Pi 4, 2 GB, Raspberry Pi OS Lite (about 0.5 GB for the OS)"},
    "pi5-8gb": {"ram_bytes": 6 * GIB, "storage_bytes": 8 * GIB, "threads": 4,
                "note": "Raspberry Pi 5, 8 GB, desktop OS (about 2 GB kept for it)"},
    "phone-3gb": {"ram_bytes": 1 * GIB, "storage_bytes": 500 * 1000**2, "threads": 4,
                  "note": "3 GB Android phone: about 1 GB for one foreground app; 4 big cores"},
    "laptop-8gb": {"ram_bytes": 4 * GIB, "storage_bytes": 4 * GIB, "threads": 4,
                   "note": "8 GB laptop with a browser open (about 4 GB free)"},
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "ki": 1 << 10, "mib": MIB, "mi": MIB, "gib": GIB, "gi": GIB,
          "tib": 1 << 40, "ti": 1 << 40}


class FitError(PackagerError):
    """Unreadable candidates or budgets."""


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes of "2GB" (10^9), "1.5GiB" (2^30), "500MB", "300M" or a plain byte count."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise FitError(f"{what} {text!r}: expected a size such as 2GB, 1.5GiB or 500MB")
    return int(float(match.group(1)) * _UNITS[unit])


def human(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1000**3:
        return f"{n / 1000**3:.2f} GB"
    return f"{n / 1000**2:.1f} MB"


@dataclass
class Candidate:
    name: str
    path: str
    format: str
    quantization: str | None
    directions: list[str]
    chrf: dict[str, float]  # "en->de" -> chrF++
    storage_bytes: int
    ram_bytes: int | None
    ram_source: str  # "measured" | "estimated" | "unknown"
    notes: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    candidate: Candidate
    fits: bool
    reasons: list[str]


def _pair_key(slug: str) -> str:
    from runtime.languages import parse_pair

    return str(parse_pair(slug))


def _chrf_by_direction(metrics: dict) -> dict[str, float]:
    out = {}
    for slug, item in (metrics.get("directions") or {}).items():
        value = item.get("chrf++") if isinstance(item, dict) else None
        if isinstance(value, (int, float)):
            out[_pair_key(slug)] = float(value)
    return out


def _from_manifest(data: dict, path: str, model_dir: Path | None) -> Candidate:
    from runtime.schema import BundleManifest

    manifest = BundleManifest.from_dict(data, source=path)
    storage = sum(entry["bytes"] for entry in manifest.files.values())
    ram, source, notes = manifest.min_ram_bytes or None, "measured", []
    if not ram:
        model = model_dir / manifest.model_files[0] if model_dir is not None else None
        ram = estimate_ram_bytes(model, manifest.format, storage) if model is not None else None
        source = "estimated" if ram else "unknown"
    return Candidate(name=Path(path).parent.name if path.endswith("manifest.json") else Path(path).name, path=path,
                     format=manifest.format, quantization=manifest.quantization.get("type"),
                     directions=list(manifest.directions), chrf=_chrf_by_direction(manifest.metrics),
                     storage_bytes=storage, ram_bytes=ram, ram_source=source, notes=notes)


def _from_archive(path: Path) -> Candidate:
    from runtime.bundle import MANIFEST_NAME

    try:
        with tarfile.open(path, "r:*") as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and Path(m.name).name == MANIFEST_NAME), None)
            if member is None:
                raise FitError(f"{path}: no {MANIFEST_NAME} in the archive; not a bundle made by `packager bundle --archive`")
            data = json.loads(tar.extractfile(member).read().decode("utf-8"))
    except (tarfile.TarError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FitError(f"{path}: unreadable bundle archive ({exc})") from None
    candidate = _from_manifest(data, str(path), None)
    candidate.name = path.name
    return candidate


def _from_report(path: Path) -> list[Candidate]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FitError(f"{path}: not a readable report.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("packs"), dict):
        raise FitError(f"{path}: not a report.json of `packager report` (no 'packs')")
    out = []
    for pack, body in data["packs"].items():
        for row in body.get("rows", []):
            peak = row.get("peak_rss_bytes")
            chrf = {_pair_key(slug): float(d["chrf++"]) for slug, d in (row.get("directions") or {}).items()
                    if isinstance(d, dict) and isinstance(d.get("chrf++"), (int, float))}
            out.append(Candidate(
                name=f"{pack}/{row.get('name')}", path=str(row.get("metrics_file") or path), format=str(row.get("format")),
                quantization=row.get("quantization"), directions=sorted(chrf), chrf=chrf,
                storage_bytes=int(row.get("file_bytes") or 0),
                ram_bytes=int(math.ceil(peak * RAM_MARGIN / MIB) * MIB) if peak else None,
                ram_source="measured" if peak else "unknown"))
    return out


def load_candidates(source: str | os.PathLike) -> list[Candidate]:
    """Bundles in a directory (or one bundle directory / archive), or the rows of a report.json."""
    from runtime.bundle import ARCHIVE_SUFFIX, MANIFEST_NAME

    source = Path(source)
    if not source.exists():
        raise FitError(f"{source}: not found; give a directory of bundles, a bundle, or a report.json")
    if source.is_file() and source.suffix == ".json":
        return _from_report(source)
    if source.is_file() and source.name.endswith(ARCHIVE_SUFFIX):
        return [_from_archive(source)]
    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        return [_read_bundle_dir(source)]
    if not source.is_dir():
        raise FitError(f"{source}: not a bundle, a directory of bundles or a report.json")
    found = []
    for child in sorted(source.iterdir()):
        if child.is_dir() and (child / MANIFEST_NAME).is_file():
            found.append(_read_bundle_dir(child))
        elif child.is_file() and child.name.endswith(ARCHIVE_SUFFIX) and not (source / child.name[:-len(ARCHIVE_SUFFIX)]).is_dir():
            found.append(_from_archive(child))  # an archive beside its directory is the same bundle
    if not found:
        raise FitError(f"{source}: holds no bundle (no */{MANIFEST_NAME} and no *{ARCHIVE_SUFFIX}); make them with `packager bundle`")
    return found


def load_bundle_dirs(paths: Sequence[str | os.PathLike]) -> list[Candidate]:
    """Candidates of these bundle directories (what `packager build` made)."""
    return [_read_bundle_dir(Path(p)) for p in paths]


def _read_bundle_dir(path: Path) -> Candidate:
    from runtime.bundle import MANIFEST_NAME
    from runtime.errors import EdgeError

    manifest_path = path / MANIFEST_NAME
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
        candidate = _from_manifest(data, str(manifest_path), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FitError(f"{manifest_path}: unreadable ({exc})") from None
    except EdgeError as exc:
        raise FitError(str(exc)) from None
    candidate.name, candidate.path = path.name, str(path)
    return candidate


# Measured by bench/runtime_baseline_bench.py on the default model (fresh processes that load and
# translate as `edge-translate` does, one thread): peak RSS minus what the dry run below accounts
# for. It is the interpreter and the runtime's imports (RSS before the backend is imported),
# library code paged in while translating and the heap a translation run grows; rounded up to the
# MiB. bench/results/ram_estimate.json checks the estimate against every demo bundle's peak.
RUNTIME_BYTES = {"gguf": 46 * MIB, "onnx": 45 * MIB}
DEFAULT_N_CTX = 2048


def estimate_ram_bytes(model_file: Path | None, fmt: str, storage_bytes: int) -> int | None:
    """Peak RSS estimate for a bundle verify did not measure, plus the same 10% margin as a
    measured figure: RUNTIME_BYTES plus a dry run of the runtime in a child process.
    GGUF: llama.cpp's memory breakdown at the runtime's context settings without reading the
    weights (`gguf_memory_breakdown`): weights (memory-mapped, all read while translating),
    KV cache and output buffer, plus what the dry-run process itself grew by (vocabulary,
    tensor and graph metadata). The compute buffer is left out: llama.cpp reserves it for a
    512-token batch with the logits of every position, and the runtime asks for the last
    position's logits only, so those pages are never touched (measured: bench/results/
    ram_estimate.json). Without llama-cpp-python the same terms come from the GGUF metadata
    with the worst-case compute buffer instead (larger, safe). ONNX: the RSS an ONNX Runtime
    session adds when the runtime loads the bundle (`onnx_session_bytes`, reads the weights,
    runs nothing); without it, twice the files."""
    if fmt == "gguf" and model_file is not None and model_file.is_file():
        dry = gguf_memory_breakdown(model_file)
        if dry is not None:
            need = dry["model"] + dry["kv"] + dry["output"] + dry["load_rss"]
        else:
            formula = _gguf_formula(model_file)
            if formula is None:
                return None
            need = sum(formula.values())
        return int((RUNTIME_BYTES["gguf"] + need) * RAM_MARGIN)
    if fmt == "onnx":
        from runtime.bundle import is_bundle

        target = model_file.parent if model_file is not None and is_bundle(model_file.parent) else model_file
        session = onnx_session_bytes(target) if target is not None and target.exists() else None
        return int((RUNTIME_BYTES["onnx"] + (session if session is not None else 2 * storage_bytes)) * RAM_MARGIN)
    return None


_DRY_RUN = r"""
import json, logging, re, sys
from runtime.backends.llama_cpp_backend import llama_module, logger
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logger.addHandler(Keep()); logger.setLevel(logging.DEBUG); logger.propagate = False
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
ll = llama_module()
ll.llama_backend_init()
before = rss()
mp = ll.llama_model_default_params()
mp.no_alloc = True                      # llama.cpp's memory-fit pass: metadata only, allocations simulated
mp.load_mode = ll.LLAMA_LOAD_MODE_NONE
model = ll.llama_model_load_from_file(sys.argv[1].encode(), mp)
if not model:
    sys.exit(3)
n_ctx = min(int(sys.argv[2]), ll.llama_model_n_ctx_train(model) or int(sys.argv[2]))
cp = ll.llama_context_default_params()  # as the llama.cpp backend sets them for one sequence (verify)
cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, min(512, n_ctx)
cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
if not ll.llama_init_from_model(model, cp):
    sys.exit(4)
def mib(pattern):
    found = [float(m.group(1)) for line in lines for m in [re.search(pattern, line)] if m]
    return int(sum(found) * 2**20)
print(json.dumps({"model": int(ll.llama_model_size(model)), "kv": mib(r"llama_kv_cache: size = +([0-9.]+) MiB"),
                  "output": mib(r"output buffer size = +([0-9.]+) MiB"),
                  "compute": mib(r"compute buffer size = +([0-9.]+) MiB"), "load_rss": rss() - before}))
"""

_SESSION_RUN = r"""
import sys
from runtime.backends import backend_class, resolve_model
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
model_file, config = resolve_model(sys.argv[1])  # a bundle directory or an exported model
cls = backend_class(config.format)
before = rss()                          # the runtime before its backend library is imported
backend = cls.load(model_file, config, n_threads=1)
print(rss() - before)
"""


def onnx_session_bytes(path: Path) -> int | None:
    """RSS that loading an ONNX bundle (or an exported model.onnx) adds (onnxruntime and tokenizers imported, the session and
    tokenizer created, nothing run), measured in a child process; None when that fails."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _SESSION_RUN, str(path)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def gguf_memory_breakdown(model_file: Path, n_ctx: int = DEFAULT_N_CTX) -> dict[str, int] | None:
    """llama.cpp's memory breakdown (bytes of weights, KV cache, output and compute buffers) from
    a dry run (`no_alloc`, as llama.cpp's --fit does), and `load_rss`: what the dry-run process
    grew by while loading. In a child process since llama.cpp aborts on what it cannot load;
    None when the dry run fails."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _DRY_RUN, str(model_file), str(n_ctx)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _gguf_formula(model_file: Path) -> dict[str, int] | None:
    """The breakdown's terms from the GGUF metadata (when the dry run is not possible)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    reader = GGUFReader(str(model_file), "r")
    arch = _field(reader, "general.architecture")
    if not arch:
        return None
    n_layer = int(_field(reader, f"{arch}.block_count") or 0)
    n_embd = int(_field(reader, f"{arch}.embedding_length") or 0)
    n_head = int(_field(reader, f"{arch}.attention.head_count") or 1)
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)
    head_k = int(_field(reader, f"{arch}.attention.key_length") or (n_embd // max(n_head, 1)))
    head_v = int(_field(reader, f"{arch}.attention.value_length") or head_k)
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens") or [])
    weights = sum(int(t.n_bytes) for t in reader.tensors)
    n_ctx = min(DEFAULT_N_CTX, int(_field(reader, f"{arch}.context_length") or DEFAULT_N_CTX))  # as the runtime
    del reader
    # compute: logits of a 512-token ubatch plus its activations (llama.cpp reserves the worst case)
    return {"model": weights, "kv": n_layer * n_ctx * n_head_kv * (head_k + head_v) * 2,
            "compute": min(512, n_ctx) * (n_vocab + 4 * n_embd) * 4}


def _field(reader, key: str):
    field_ = reader.fields.get(key)
    if field_ is None:
        return None
    try:
        return field_.contents()
    except Exception:  # gguf-py versions differ; a missing value is an unknown, not an error
        return None


def judge(candidates: Sequence[Candidate], direction: str, ram_bytes: int | None, storage_bytes: int | None) -> list[Verdict]:
    """Every candidate for `direction`, best first; `fits` says whether it is within budget."""
    verdicts = []
    for c in candidates:
        if direction not in c.directions:
            continue
        reasons = []
        if ram_bytes is not None:
            if c.ram_bytes is None:
                reasons.append("RAM need unknown (no measured peak RSS and no estimate)")
            elif c.ram_bytes > ram_bytes:
                reasons.append(f"needs {human(c.ram_bytes)} RAM ({c.ram_source}) > {human(ram_bytes)}")
        if storage_bytes is not None and c.storage_bytes > storage_bytes:
            reasons.append(f"{human(c.storage_bytes)} of files > {human(storage_bytes)} storage")
        verdicts.append(Verdict(c, not reasons, reasons))

    def key(v: Verdict):
        chrf = v.candidate.chrf.get(direction)
        return (chrf is None, -round(chrf or 0.0, 2), v.candidate.ram_bytes if v.candidate.ram_bytes is not None else math.inf,
                v.candidate.storage_bytes, v.candidate.name)

    return sorted(verdicts, key=key)


def fit(candidates: Sequence[Candidate], directions: Sequence[str] | None, ram_bytes: int | None,
        storage_bytes: int | None) -> dict[str, list[Verdict]]:
    """direction -> verdicts (best first). `directions` default: every direction offered."""
    from runtime.languages import parse_pair

    if directions:
        wanted = [str(parse_pair(d)) for d in directions]
    else:
        wanted = sorted({d for c in candidates for d in c.directions})
    return {d: judge(candidates, d, ram_bytes, storage_bytes) for d in wanted}


def describe(results: dict[str, list[Verdict]], ram_bytes: int | None, storage_bytes: int | None) -> tuple[list[str], bool]:
    """Text lines for the user and whether every direction has a bundle that fits."""
    lines = [f"budget: RAM {human(ram_bytes) if ram_bytes is not None else 'any'}, "
             f"storage {human(storage_bytes) if storage_bytes is not None else 'any'}"]
    ok = True
    for direction, verdicts in results.items():
        best = next((v for v in verdicts if v.fits), None)
        if not verdicts:
            lines.append(f"{direction}: no bundle offers this direction")
            ok = False
            continue
        if best is None:
            ok = False
            lines.append(f"{direction}: nothing fits ({len(verdicts)} bundle(s) offer it)")
        else:
            c = best.candidate
            lines.append(f"{direction}: {c.name}  chrF++ {_chrf(c, direction)}, RAM {human(c.ram_bytes)} ({c.ram_source}), "
                         f"files {human(c.storage_bytes)}, {c.format} {c.quantization or ''}".rstrip())
        for v in verdicts:
            if v is best:
                continue
            c = v.candidate
            if v.reasons:
                why = "; ".join(v.reasons)
            elif round(c.chrf.get(direction, -1.0), 2) == round(best.candidate.chrf.get(direction, -1.0), 2):
                why = f"fits, same chrF++ {_chrf(c, direction)}: the tie goes to less RAM, then fewer bytes, then the name"
            else:
                why = f"fits, lower chrF++ ({_chrf(c, direction)})"
            lines.append(f"    {c.name}: {why}")
    return lines, ok


def _chrf(c: Candidate, direction: str) -> str:
    value = c.chrf.get(direction)
    return "not measured" if value is None else f"{value:.2f}"
