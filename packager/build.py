"""`packager build PACKS.toml --out RUN_DIR`: the whole chain for several language packs.

calibrate (once, over every direction of every pack) -> for each pack x drop ratio x
variant: plan -> prune -> export -> verify -> bundle; the parent is exported and verified
once per variant (same format and quantization, for the ratios); then the report.

Resumable: each step has a key, the sha256 of its settings, of its inputs' keys (input
files are hashed once, by content) and of the source files of the code that computes it
(packager.core.code_version: the stage's module and every project module it imports). A step whose
record in RUN_DIR/.steps/ carries the same key and whose outputs exist is skipped; anything
else is (re)done, and so is every step downstream of it. Stop it at any point and run the same
command again; after a code change, only what that code computes is done again.

PACKS.toml (paths are relative to the TOML file):

    parent = "../models/default"          # Hugging Face MoE checkpoint (the embedded default),
                                          # or a GGUF file: parent = "model.Q8_0.gguf" (see below)
    drop_ratios = [0.25, 0.5]
    ranker = "routing-mass"               # default for every variant
    threads = 2                           # runtime / quantizer threads
    archive = false                       # also write BUNDLE.tar
    profiles = ["pi4-2gb", "phone-3gb"]   # optional: RUN/fit.json names the best bundle per direction
                                          # that fits each device profile (packager fit)

    [calibration]
    data = ["../data/harvest/dev.jsonl"]
    max_sentences = 100                   # per direction
    teacher_forced = false
    max_new_tokens = 64
    # a parent larger than RAM (Hugging Face parents): execution = "streamed", dtype = "bfloat16",
    # generator = "parent.Q8_0.gguf" (translates for generate mode), spill_dir, expert_group_mb

    [verify]
    test = "../data/harvest/test.jsonl"
    limit = 100                           # segments per direction
    max_new_tokens = 128

    [[variant]]                           # one exported model per (format, quantization)
    format = "gguf"
    allocation = "uniform"                # stock llama.cpp loads only one expert count
    quant = ["F16", "Q8_0"]

    [[variant]]
    format = "onnx"
    allocation = "dynamic"
    quant = ["fp32"]

    [[pack]]
    name = "en-de"
    directions = "en->de"

A GGUF parent (`parent = "path/model.gguf"`) builds with no Hugging Face weights and neither
torch nor transformers (the `gguf` extra): calibrate in llama.cpp (packager.calibrate_gguf) ->
plan -> prune-gguf -> quantize (when asked) -> verify -> bundle -> report. Its variants are
GGUF only (ONNX export and distillation need the safetensors weights); `quant` defaults to the
parent's own type (the pruned file as prune-gguf writes it) and may add llama.cpp types to
quantize to when the parent is F32/F16/BF16 (llama.cpp does not re-quantize a quantized file).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from packager import __version__
from packager.core.errors import PackagerError
from runtime.errors import EdgeError

logger = logging.getLogger(__name__)

STEPS_DIR = ".steps"
HASH_LIMIT_BYTES = 1 << 30
GGUF_BASE_TYPES = {"F16": "f16", "F32": "f32"}
FORMATS = ("gguf", "onnx")
ALLOCATIONS = ("uniform", "dynamic", "inverted-dynamic")
VARIANT_KEYS = ("format", "allocation", "ranker", "quant")
UNQUANTIZED_GGUF_TYPES = ("F32", "F16", "BF16")  # a GGUF parent of these types may be quantized further
# the module whose code writes a variant's files: format -> (Hugging Face parent, GGUF parent)
EXPORTERS = {"gguf": ("converters.gguf.export", "converters.gguf.quantize"), "onnx": ("converters.onnx.export", None)}


class BuildError(PackagerError):
    """A build file that cannot be read, or a chain that cannot run."""


# -- the build file ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    format: str
    allocation: str
    ranker: str
    quant: tuple[str, ...]

    @property
    def slug(self) -> str:
        return f"{self.format}-{self.allocation}-{self.ranker}"


@dataclass(frozen=True)
class PackSpec:
    name: str
    directions: str
    pairs: tuple[str, ...]            # canonical "en->de"
    langs: tuple[str, ...]            # non-English languages (planning)
    direction: str                    # en-x | x-en | both (planning)
    drop_ratios: tuple[float, ...]


@dataclass
class BuildConfig:
    source: Path
    parent: Path                      # a Hugging Face directory or a .gguf file
    packs: list[PackSpec]
    variants: list[Variant]
    calibration_data: list[Path]
    calibration: dict[str, Any]
    test_file: Path
    verify: dict[str, Any]
    threads: int | None
    archive: bool
    sha256: str = ""
    parent_gguf_type: str | None = None   # a GGUF parent's own type ("F16", "Q8_0", ...); None: Hugging Face parent
    profiles: tuple[str, ...] = ()        # device profiles (packager.fit.PROFILES): fit.json names the best bundle for each

    @property
    def gguf_parent(self) -> bool:
        return self.parent_gguf_type is not None

    @property
    def all_pairs(self) -> list[str]:
        pairs: list[str] = []
        for pack in self.packs:
            pairs += [p for p in pack.pairs if p not in pairs]
        return pairs


def _fail(source: Path, message: str) -> BuildError:
    return BuildError(f"{source}: {message}")


def _path(source: Path, value: Any, key: str, must_exist: str | None = None) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(source, f"{key} must be a path string, got {value!r}")
    path = (source.parent / value).resolve() if not Path(value).is_absolute() else Path(value)
    if must_exist == "dir" and not path.is_dir():
        raise _fail(source, f"{key} = {value!r}: directory {path} not found")
    if must_exist == "file" and not path.is_file():
        hint = " (run `make data-eval` to harvest it)" if "harvest" in value else ""
        raise _fail(source, f"{key} = {value!r}: file {path} not found{hint}")
    return path


def _pack_planning(source: Path, name: str, pairs) -> tuple[tuple[str, ...], str]:
    """(non-English languages, planning direction) of a pack; every direction involves English."""
    from runtime.languages import parse_language

    english = parse_language("en")
    langs: list[str] = []
    kinds = set()
    for pair in pairs:
        if pair.src == english:
            other, kind = pair.tgt, "en-x"
        elif pair.tgt == english:
            other, kind = pair.src, "x-en"
        else:
            raise _fail(source, f"pack {name!r}: direction {pair} does not involve English; packs are built from "
                                f"English-centred statistics (en->X, X->en)")
        kinds.add(kind)
        if other.code not in langs:
            langs.append(other.code)
    direction = kinds.pop() if len(kinds) == 1 else "both"
    if direction == "both":
        want = {(l, k) for l in langs for k in ("en-x", "x-en")}
        have = {((p.tgt if p.src == english else p.src).code, "en-x" if p.src == english else "x-en") for p in pairs}
        if want != have:
            raise _fail(source, f"pack {name!r}: mixes directions unevenly; use 'en<->xx' for both directions of a language")
    return tuple(langs), direction


def load_build_config(path: str | os.PathLike) -> BuildConfig:
    """Parse and check PACKS.toml; raises BuildError naming the file and the key."""
    from packager.verify import VerifyError, parse_pair_list

    source = Path(path).resolve()
    try:
        raw = source.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path}: build file not found; see packs/demo.toml for an example") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"{path}: not valid TOML ({exc})") from None
    known = {"parent", "drop_ratios", "ranker", "threads", "archive", "calibration", "verify", "variant", "pack", "profiles"}
    parent, parent_gguf_type = _parent(source, data.get("parent"))
    if parent_gguf_type is not None:
        _refuse_distillation(source, data, data.get("parent"))
    unknown = sorted(set(data) - known)
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    default_drops = data.get("drop_ratios", [0.5])
    default_ranker = data.get("ranker", "routing-mass")

    def drops_of(value, where: str) -> tuple[float, ...]:
        if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) and 0 < v < 1 for v in value):
            raise _fail(source, f"{where} must be a non-empty list of ratios in (0, 1), got {value!r}")
        return tuple(sorted({float(v) for v in value}))

    drops_of(default_drops, "drop_ratios")
    packs = []
    for i, item in enumerate(data.get("pack", [])):
        where = f"[[pack]] #{i + 1}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("directions"), str):
            raise _fail(source, f"{where} needs name = \"...\" and directions = \"en->de\"")
        name = item["name"]
        if not name or "/" in name or name.startswith("."):
            raise _fail(source, f"{where}: name {name!r} must be a plain file name")
        try:
            pairs = parse_pair_list(item["directions"])
        except VerifyError as exc:
            raise _fail(source, f"{where}: {exc}") from None
        langs, direction = _pack_planning(source, name, pairs)
        packs.append(PackSpec(name, item["directions"], tuple(str(p) for p in pairs), langs, direction,
                              drops_of(item.get("drop_ratios", default_drops), f"{where} drop_ratios")))
    if not packs:
        raise _fail(source, "no [[pack]]: add at least one, e.g. name = \"en-de\", directions = \"en->de\"")
    if len({p.name for p in packs}) != len(packs):
        raise _fail(source, "two packs have the same name")
    variants = []
    for i, item in enumerate(data.get("variant", [])):
        where = f"[[variant]] #{i + 1}"
        if not isinstance(item, dict):
            raise _fail(source, f"{where} must be a table with format = \"gguf\" or \"onnx\"")
        extra = sorted(set(item) - set(VARIANT_KEYS))
        if extra:
            raise _fail(source, f"{where}: unknown key(s) {', '.join(extra)}; known: {', '.join(VARIANT_KEYS)}")
        fmt = item.get("format")
        if fmt not in FORMATS:
            raise _fail(source, f"{where}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if parent_gguf_type is not None and fmt != "gguf":
            raise _fail(source, f"{where}: format = {fmt!r} needs a Hugging Face parent, but parent = {data['parent']!r} is a GGUF "
                                f"({fmt} export reads the safetensors weights); use format = \"gguf\" or name the Hugging Face "
                                f"checkpoint as parent")
        allocation = item.get("allocation", "uniform" if fmt == "gguf" else "dynamic")
        if allocation not in ALLOCATIONS:
            raise _fail(source, f"{where}: allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
        if fmt == "gguf" and allocation != "uniform":
            raise _fail(source, f"{where}: stock llama.cpp loads one expert count per model, so GGUF needs "
                                f"allocation = \"uniform\" (use ONNX for {allocation} allocation)")
        default_quant = [parent_gguf_type] if parent_gguf_type is not None else ["F16"] if fmt == "gguf" else ["fp32"]
        quant = item.get("quant", default_quant)
        if not isinstance(quant, list) or not quant or not all(isinstance(q, str) for q in quant):
            raise _fail(source, f"{where}: quant must be a list of quantization types, got {quant!r}")
        if parent_gguf_type is not None:
            quant = _gguf_parent_quant(source, where, quant, parent_gguf_type)
        elif fmt == "gguf" and sum(q.upper() in GGUF_BASE_TYPES for q in quant) > 1:
            raise _fail(source, f"{where}: give at most one of F16 / F32 (the unquantized export)")
        ranker = item.get("ranker", default_ranker)
        variants.append(Variant(fmt, allocation, ranker, tuple(quant)))
    if not variants:
        raise _fail(source, "no [[variant]]: add e.g. format = \"gguf\", quant = [\"F16\"]")
    from packager.planning import RANKERS

    for variant in variants:
        if variant.ranker not in RANKERS:
            raise _fail(source, f"ranker {variant.ranker!r} is unknown; use one of {', '.join(RANKERS)}")
    calibration = dict(data.get("calibration", {}))
    verify_settings = dict(data.get("verify", {}))
    calibration_data = [_path(source, p, "calibration.data", "file") for p in calibration.pop("data", [])]
    if not calibration_data:
        raise _fail(source, "[calibration] data = [...] is required (harvest JSONL, e.g. data/harvest/dev.jsonl)")
    allowed = {"max_sentences", "teacher_forced", "max_new_tokens", "batch_size", "seed", "reap"}
    # how a Hugging Face parent runs (packager.core.layer_stream): they change memory and speed, not results
    execution_keys = {"dtype", "device", "execution", "expert_group_mb", "max_activation_mb", "spill_dir", "generator"}
    if set(calibration) - allowed - execution_keys:
        raise _fail(source, f"[calibration] unknown key(s) {', '.join(sorted(set(calibration) - allowed - execution_keys))}")
    if str(data.get("parent", "")).lower().endswith(".gguf") and set(calibration) & execution_keys:
        raise _fail(source, f"[calibration] {', '.join(sorted(set(calibration) & execution_keys))}: only for a Hugging Face "
                            "parent (a GGUF parent runs in llama.cpp in its own tensor types)")
    if "expert_group_mb" in calibration:
        calibration["expert_group_bytes"] = int(calibration.pop("expert_group_mb")) * 1024**2
    for key, kind in (("spill_dir", "dir"), ("generator", "file")):
        if key in calibration:
            calibration[key] = str(_path(source, calibration[key], f"calibration.{key}", kind))
    test_file = _path(source, verify_settings.pop("test", None), "verify.test", "file")
    if set(verify_settings) - {"limit", "max_new_tokens", "bootstrap"}:
        raise _fail(source, f"[verify] unknown key(s) {', '.join(sorted(set(verify_settings) - {'limit', 'max_new_tokens', 'bootstrap'}))}")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise _fail(source, f"threads must be a positive integer, got {threads!r}")
    from packager.fit import PROFILES

    profiles = data.get("profiles", [])
    if not isinstance(profiles, list) or any(name not in PROFILES for name in profiles):
        raise _fail(source, f"profiles must be a list of device profiles ({', '.join(PROFILES)}), got {profiles!r}")
    return BuildConfig(source, parent, packs, variants, calibration_data, calibration, test_file, verify_settings,
                       threads, bool(data.get("archive", False)), hashlib.sha256(raw).hexdigest(), parent_gguf_type,
                       tuple(profiles))


def _parent(source: Path, value: Any) -> tuple[Path, str | None]:
    """(parent path, its GGUF type or None): a Hugging Face directory, or a GGUF file checked
    with gguf-py (family, MoE routers, F32 routers) before anything runs."""
    path = _path(source, value, "parent")
    if path.is_dir():
        return path, None
    if not path.exists():
        kind = "GGUF file" if path.suffix == ".gguf" else "directory"
        raise _fail(source, f"parent = {value!r}: {kind} {path} not found")
    from converters.gguf.gguf_file import file_type_name, gguf_fingerprint, model_facts, open_gguf

    try:
        reader = open_gguf(path)
        facts = model_facts(reader, path)
        gguf_fingerprint(reader, path)  # routers present and F32: plans and stats can be checked against it
        file_type = file_type_name(reader, facts)
    except PackagerError as exc:
        raise _fail(source, f"parent = {value!r}: {' '.join(str(exc).split())}") from None
    finally:
        reader = None
    if len(set(facts.n_experts.values())) != 1:
        raise _fail(source, f"parent = {value!r}: layers have different expert counts; give the unpruned parent")
    return path, file_type.upper()


def _refuse_distillation(source: Path, data: dict, parent_value: str) -> None:
    """Distillation fine-tunes the pruned Hugging Face weights with torch: a GGUF parent has none."""
    places = ["distill"] if "distill" in data else []
    places += [f"[[variant]] #{i + 1} distill" for i, item in enumerate(data.get("variant", []))
               if isinstance(item, dict) and "distill" in item]
    if places:
        raise _fail(source, f"{places[0]}: distillation needs a Hugging Face parent (it fine-tunes the pruned safetensors "
                            f"weights with torch), but parent = {parent_value!r} is a GGUF; remove it or name the "
                            f"Hugging Face checkpoint as parent")


def _gguf_parent_quant(source: Path, where: str, quant: list[str], parent_type: str) -> list[str]:
    """Quantization types of a GGUF parent's variant: its own type (the pruned file as is) or,
    for an unquantized parent, a llama.cpp type to quantize to."""
    from converters.gguf.errors import QuantizeError
    from converters.gguf.quantize import parse_quant_types

    out: list[str] = []
    for q in quant:
        name = q.strip().upper()
        if name != parent_type:
            if parent_type not in UNQUANTIZED_GGUF_TYPES:
                raise _fail(source, f"{where}: quant {q!r}: the GGUF parent is already {parent_type} and llama.cpp does not "
                                    f"re-quantize a quantized file; use quant = [\"{parent_type}\"] (the parent's own type) "
                                    f"or an F32/F16 parent")
            try:
                parse_quant_types([name])
            except QuantizeError as exc:
                raise _fail(source, f"{where}: {exc}") from None
        if name not in out:
            out.append(name)
    return out


# -- steps -------------------------------------------------------------------------------------
@dataclass
class Step:
    id: str
    title: str
    inputs: dict[str, Any]
    outputs: list[Path]
    run: Callable[[], Any]
    key: str = ""
    status: str = "pending"
    seconds: float = 0.0


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _code(module: str) -> str:
    """Digest of the source files that `module` runs: a step's inputs carry it, so a code change
    redoes the step and, through the keys that chain them, every step downstream."""
    from packager.core.code_version import code_digest

    return code_digest(module)


def _step_key(step: Step) -> str:
    return _key({"step": step.id, "inputs": step.inputs})


class StepRunner:
    """Runs steps in order, skipping those whose record matches (resumable)."""

    def __init__(self, run_dir: Path, console) -> None:
        self.run_dir = run_dir
        self.records = run_dir / STEPS_DIR
        self.console = console
        self.steps: list[Step] = []

    def record_path(self, step: Step) -> Path:
        return self.records / f"{step.id.replace('/', '__')}.json"

    def up_to_date(self, step: Step) -> bool:
        path = self.record_path(step)
        if not path.is_file():
            return False
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return record.get("key") == step.key and all(p.exists() for p in step.outputs)

    def run(self, step: Step, index: int, total: int) -> None:
        from runtime.atomic import atomic_write_json

        step.key = _step_key(step)
        prefix = f"[{index}/{total}] {step.title}"
        if self.up_to_date(step):
            step.status = "skipped"
            self.console.print(f"{prefix} [dim]up to date[/dim]")
            return
        self.console.print(f"{prefix} ...")
        for output in step.outputs:  # an older, different result: replaced
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()
        started = time.monotonic()
        try:
            step.run()
        except EdgeError as exc:  # runtime errors are not PackagerErrors: one line all the same
            raise BuildError(f"{step.title}: {exc}") from None
        except BaseException:
            self.console.print(f"{prefix} [red]failed[/red] (finished steps are kept; run again to resume)")
            raise
        step.seconds = round(time.monotonic() - started, 2)
        missing = [str(p) for p in step.outputs if not p.exists()]
        if missing:
            raise BuildError(f"step {step.id}: finished without writing {', '.join(missing)}")
        self.records.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_path(step), {"key": step.key, "inputs": step.inputs,
                                                   "outputs": [str(p) for p in step.outputs], "seconds": step.seconds,
                                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        step.status = "done"
        self.console.print(f"{prefix} [green]done[/green] in {step.seconds:.1f} s")


# -- exporters ---------------------------------------------------------------------------------
def _gguf_outputs(out_file: Path, quant: Sequence[str]) -> tuple[str, list[str], dict[str, Path]]:
    """(base dtype, llama.cpp quant types, quant name -> file) for one GGUF export."""
    from converters.gguf.export import quantized_path

    base = next((GGUF_BASE_TYPES[q.upper()] for q in quant if q.upper() in GGUF_BASE_TYPES), "f16")
    others = [q for q in quant if q.upper() not in GGUF_BASE_TYPES]
    files = {q: (out_file if q.upper() in GGUF_BASE_TYPES else quantized_path(out_file, q)) for q in quant}
    return base, others, files


def export_model(fmt: str, model_dir: Path, out_dir: Path, quant: Sequence[str], threads: int | None) -> dict[str, Path]:
    """Export `model_dir` into `out_dir`; returns quantization -> model file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        from converters.gguf.export import export_gguf

        out_file = out_dir / "model.gguf"
        base, others, files = _gguf_outputs(out_file, quant)
        export_gguf(model_dir, out_file, others, dtype=base, force=True, progress=True, n_threads=threads)
        return files
    if fmt == "onnx":
        from converters.onnx.export import export_onnx

        files = expected_exports(fmt, out_dir, quant)
        for q in quant:  # one directory per quantization (model.onnx, tokenizer.json, export config)
            export_onnx(model_dir, files[q].parent, quant=q, force=True, progress=True)
        return files
    raise BuildError(f"unknown format {fmt!r}")


def gguf_parent_files(model_file: Path, out_dir: Path, quant: Sequence[str], own_type: str) -> dict[str, Path]:
    """A GGUF parent's variant: quantization -> file; its own type is `model_file` itself, any
    other type a llama.cpp-quantized copy in `out_dir` (model.Q8_0.gguf)."""
    from converters.gguf.export import quantized_path

    return {q: model_file if q == own_type else quantized_path(out_dir / "model.gguf", q) for q in quant}


def quantize_files(model_file: Path, files: dict[str, Path], threads: int | None) -> None:
    from converters.gguf.quantize import quantize_gguf

    for q, out_file in files.items():
        out_file.parent.mkdir(parents=True, exist_ok=True)
        quantize_gguf(model_file, out_file, q, force=True, n_threads=threads)


def expected_exports(fmt: str, out_dir: Path, quant: Sequence[str]) -> dict[str, Path]:
    if fmt == "gguf":
        return _gguf_outputs(out_dir / "model.gguf", quant)[2]
    from converters.onnx.export import MODEL_FILE

    return {q: out_dir / q / MODEL_FILE for q in quant}


# -- the chain ---------------------------------------------------------------------------------
def _drop_slug(drop: float) -> str:
    return f"d{round(drop * 100):02d}"


def _file_key(path: Path) -> str:
    """Content hash; for files above HASH_LIMIT_BYTES (a huge parent) size and mtime instead,
    so that checking whether a step is up to date does not read tens of gigabytes."""
    from packager.core.fingerprint import file_sha256

    stat = path.stat()
    if stat.st_size > HASH_LIMIT_BYTES:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    return file_sha256(path)


def _dir_key(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): _file_key(p) for p in sorted(path.rglob("*")) if p.is_file()}


LOCK_NAME = ".build.lock"


@contextmanager
def run_dir_lock(run_dir: Path):
    """One build per run directory: two builds writing the same steps would corrupt each other.
    An flock dies with its process, so a killed build never leaves a stale lock behind."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_NAME).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise BuildError(f"{run_dir}: another `packager build` (pid {holder}) is writing this run directory; "
                             "wait for it to finish or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def build(packs_file: str | os.PathLike, run_dir: str | os.PathLike, *, dry_run: bool = False, console=None,
          command: str | None = None) -> dict:
    """Run (or with `dry_run` list) every step; returns the build record (also RUN_DIR/build.json)."""
    config = load_build_config(packs_file)
    run_dir = Path(run_dir).resolve()
    with run_dir_lock(run_dir):
        return _build(config, run_dir, dry_run=dry_run, console=console, command=command)


def _build(config: BuildConfig, run_dir: Path, *, dry_run: bool, console, command: str | None) -> dict:
    from rich.console import Console

    from runtime.atomic import atomic_write_json

    console = console or Console(stderr=True)
    runner = StepRunner(run_dir, console)
    steps: list[Step] = []
    inputs = {
        "parent": {config.parent.name: _file_key(config.parent)} if config.gguf_parent else _dir_key(config.parent),
        "calibration_data": {str(p): _file_key(p) for p in config.calibration_data},
        "test": _file_key(config.test_file),
    }
    threads = config.threads

    # calibration: once, every direction of every pack
    stats_path = run_dir / "calibration" / "stats.safetensors"
    calibration_inputs = {"parent": inputs["parent"], "data": inputs["calibration_data"], "pairs": config.all_pairs,
                          "settings": config.calibration,
                          "code": _code("packager.calibrate_gguf" if config.gguf_parent else "packager.calibrate")}

    def calibrate_step() -> None:
        from runtime.languages import parse_pair

        stats_path.parent.mkdir(parents=True, exist_ok=True)
        pairs = tuple(parse_pair(p).slug for p in config.all_pairs)
        if config.gguf_parent:  # inside llama.cpp: neither torch nor transformers
            from packager.calibrate_gguf import calibrate_gguf
            from packager.calibration_data import CalibrationSettings

            settings = CalibrationSettings(pairs=pairs, **config.calibration)
            stats = calibrate_gguf(config.parent, config.calibration_data, settings, command=command, show_progress=True,
                                   n_threads=threads)
        else:
            from packager.calibrate import CalibrationSettings, calibrate

            settings = CalibrationSettings(pairs=pairs, **config.calibration)
            stats = calibrate(config.parent, config.calibration_data, settings, command=command, show_progress=True)
        stats.save(stats_path)

    steps.append(Step("calibrate", f"calibrate {config.parent.name} on {', '.join(config.all_pairs)}",
                      calibration_inputs, [stats_path], calibrate_step))
    calibration_key = _key(calibration_inputs)

    verify_settings = {"limit": config.verify.get("limit"), "max_new_tokens": config.verify.get("max_new_tokens", 256),
                       "n_bootstrap": config.verify.get("bootstrap", 1000), "threads": threads,
                       "code": _code("packager.verify")}

    def verify_step(model: Path, out: Path, pairs: Sequence[str], labels: dict, parent_metrics: Path | None) -> Callable[[], Any]:
        def run() -> None:
            from packager.verify import verify

            out.parent.mkdir(parents=True, exist_ok=True)
            verify(model, config.test_file, list(pairs), out, limit=verify_settings["limit"],
                   max_new_tokens=verify_settings["max_new_tokens"], n_bootstrap=verify_settings["n_bootstrap"],
                   threads=threads, parent_metrics=parent_metrics, labels=labels, command=command)
        return run

    # parent: exported and verified once per variant format+quantization
    parent_metrics: dict[tuple[str, str], Path] = {}
    exported_formats: dict[tuple[str, tuple[str, ...]], dict[str, Path]] = {}
    for fmt in dict.fromkeys(v.format for v in config.variants):
        quant = tuple(dict.fromkeys(q for v in config.variants if v.format == fmt for q in v.quant))
        out_dir = run_dir / "parent" / fmt
        export_inputs = {"model": inputs["parent"], "format": fmt, "quant": quant, "threads": threads,
                         "code": _code(EXPORTERS[fmt][config.gguf_parent])}
        if config.gguf_parent:  # the parent file itself, plus what it is quantized to
            files = gguf_parent_files(config.parent, out_dir, quant, config.parent_gguf_type)
            quantized = {q: f for q, f in files.items() if f != config.parent}
            if quantized:
                steps.append(Step(f"parent/{fmt}/quantize", f"quantize parent to {', '.join(quantized)}", export_inputs,
                                  list(quantized.values()),
                                  (lambda quantized=quantized: quantize_files(config.parent, quantized, threads))))
        else:
            files = expected_exports(fmt, out_dir, quant)
            steps.append(Step(f"parent/{fmt}/export", f"export parent to {fmt} {', '.join(quant)}", export_inputs,
                              list(files.values()),
                              (lambda fmt=fmt, out_dir=out_dir, quant=quant: export_model(fmt, config.parent, out_dir, quant, threads))))
        for q, model_file in files.items():
            out = out_dir / f"{q}.metrics.json"
            labels = {"role": "parent", "name": f"parent {fmt} {q}", "pack": "parent"}
            steps.append(Step(f"parent/{fmt}/{q}/verify", f"verify parent {fmt} {q}",
                              {"export": _key(export_inputs), "quant": q, "test": inputs["test"], "pairs": config.all_pairs,
                               "settings": verify_settings, "labels": labels},
                              [out], verify_step(model_file, out, config.all_pairs, labels, None)))
            parent_metrics[(fmt, q)] = out

    bundles: list[Path] = []
    metrics_files = list(parent_metrics.values())
    for pack in config.packs:
        for drop in pack.drop_ratios:
            plans_done: dict[tuple[str, str], tuple[Path, str]] = {}
            for variant in config.variants:
                base = run_dir / "packs" / pack.name / f"{_drop_slug(drop)}-{variant.allocation}-{variant.ranker}"
                plan_path = base / "plan.json"
                pruned_dir = base / "pruned"
                plan_inputs = {"stats": calibration_key, "langs": pack.langs, "direction": pack.direction, "drop": drop,
                               "ranker": variant.ranker, "allocation": variant.allocation, "code": _code("packager.planning")}
                prune_inputs = {"plan": _key(plan_inputs), "parent": inputs["parent"],
                                "code": _code("converters.gguf.prune_gguf" if config.gguf_parent else "packager.prune")}
                if (variant.allocation, variant.ranker) not in plans_done:
                    steps.append(Step(f"{pack.name}/{base.name}/plan", f"plan {pack.name} drop {drop:.0%} {variant.ranker}/{variant.allocation}",
                                      plan_inputs, [plan_path], _plan_runner(stats_path, plan_path, pack, drop, variant, command)))
                    if config.gguf_parent:  # prune-gguf: the pruned GGUF in the parent's own type
                        pruned_dir = base / "gguf" / "model.gguf"
                        prune_run = _prune_gguf_runner(config.parent, plan_path, pruned_dir)
                    else:
                        prune_run = _prune_runner(config.parent, plan_path, pruned_dir)
                    steps.append(Step(f"{pack.name}/{base.name}/prune", f"prune {pack.name} drop {drop:.0%} {variant.allocation}",
                                      prune_inputs, [pruned_dir], prune_run))
                    plans_done[(variant.allocation, variant.ranker)] = (pruned_dir, _key(prune_inputs))
                pruned_dir, prune_key = plans_done[(variant.allocation, variant.ranker)]
                export_dir = base / variant.format
                export_inputs = {"pruned": prune_key, "format": variant.format, "quant": variant.quant, "threads": threads,
                                 "code": _code(EXPORTERS[variant.format][config.gguf_parent])}
                if config.gguf_parent:
                    files = gguf_parent_files(pruned_dir, export_dir, variant.quant, config.parent_gguf_type)
                    quantized = {q: f for q, f in files.items() if f != pruned_dir}
                    if quantized:
                        steps.append(Step(f"{pack.name}/{base.name}/{variant.format}/quantize",
                                          f"quantize {pack.name} drop {drop:.0%} to {', '.join(quantized)}",
                                          export_inputs, list(quantized.values()),
                                          (lambda p=pruned_dir, quantized=quantized: quantize_files(p, quantized, threads))))
                else:
                    files = expected_exports(variant.format, export_dir, variant.quant)
                    steps.append(Step(f"{pack.name}/{base.name}/{variant.format}/export",
                                      f"export {pack.name} drop {drop:.0%} to {variant.format} {', '.join(variant.quant)}",
                                      export_inputs, list(files.values()),
                                      (lambda v=variant, d=export_dir, p=pruned_dir: export_model(v.format, p, d, v.quant, threads))))
                for q, model_file in files.items():
                    name = f"{pack.name}-{variant.format}-{q}-{_drop_slug(drop)}-{variant.allocation}"
                    metrics_path = export_dir / f"{q}.metrics.json"
                    labels = {"role": "pruned", "pack": pack.directions, "name": name, "drop_ratio": drop,
                              "ranker": variant.ranker, "allocation": variant.allocation}
                    parent = parent_metrics[(variant.format, q)]
                    verify_key = {"export": _key(export_inputs), "quant": q, "test": inputs["test"], "pairs": pack.pairs,
                                  "settings": verify_settings, "labels": labels, "parent": str(parent)}
                    steps.append(Step(f"{pack.name}/{base.name}/{variant.format}/{q}/verify", f"verify {name}", verify_key,
                                      [metrics_path], verify_step(model_file, metrics_path, pack.pairs, labels, parent)))
                    bundle_dir = run_dir / "bundles" / name
                    outputs = [bundle_dir] + ([bundle_dir.with_name(bundle_dir.name + ".tar")] if config.archive else [])
                    steps.append(Step(f"bundle/{name}", f"bundle {name}",
                                      {"verify": _key(verify_key), "archive": config.archive, "code": _code("packager.bundle")},
                                      outputs, _bundle_runner(model_file, metrics_path, bundle_dir, pack, config)))
                    bundles.append(bundle_dir)
                    metrics_files.append(metrics_path)

    report_dir = run_dir / "report"

    def report_step() -> None:
        from packager.report import build_report

        build_report([run_dir], report_dir, command=command, metrics_files=metrics_files)

    steps.append(Step("report", "report", {"metrics": [str(p) for p in metrics_files], "nonce": time.time()},
                      [report_dir / "index.html"], report_step))

    record = {"schema": "packager.build/1", "packs_file": str(config.source), "packs_sha256": config.sha256,
              "run_dir": str(run_dir), "command": command, "packager_version": __version__,
              "python": sys.version.split()[0], "steps": []}
    if dry_run:
        for step in steps:
            step.key = _step_key(step)
            step.status = "up to date" if runner.up_to_date(step) else "to do"
            console.print(f"{step.status:>10}  {step.title}")
    else:
        started = time.monotonic()
        for index, step in enumerate(steps, 1):
            runner.run(step, index, len(steps))
        record["seconds"] = round(time.monotonic() - started, 1)
        console.print(f"built {len(bundles)} bundle(s) in {record['seconds']:.0f} s; report: {report_dir / 'index.html'}")
    record["steps"] = [{"id": s.id, "status": s.status, "seconds": s.seconds, "key": s.key,
                        "outputs": [str(p) for p in s.outputs]} for s in steps]
    record["bundles"] = [str(p) for p in bundles]
    record["report"] = str(report_dir / "index.html")
    if config.profiles and not dry_run:
        record["fit"] = _fit_profiles(config.profiles, bundles, run_dir, console)
    if not dry_run:
        atomic_write_json(run_dir / "build.json", record)
    return record


def _fit_profiles(profiles: Sequence[str], bundles: Sequence[Path], run_dir: Path, console) -> str:
    """`packager fit` of the built bundles for each profile of the packs file -> RUN/fit.json."""
    from packager.fit import PROFILES, describe, fit, load_bundle_dirs
    from runtime.atomic import atomic_write_json

    candidates = load_bundle_dirs(bundles)
    out = {}
    for name in profiles:
        budget = PROFILES[name]
        results = fit(candidates, None, budget["ram_bytes"], budget["storage_bytes"])
        lines, ok = describe(results, budget["ram_bytes"], budget["storage_bytes"])
        console.print(f"profile {name}:" + "".join(f"\n  {line}" for line in lines))
        out[name] = {"budget": budget, "all_directions_fit": ok,
                     "best": {d: next((v.candidate.path for v in verdicts if v.fits), None) for d, verdicts in results.items()}}
    atomic_write_json(run_dir / "fit.json", out)
    return str(run_dir / "fit.json")


def _plan_runner(stats_path: Path, plan_path: Path, pack: PackSpec, drop: float, variant: Variant, command):
    def run() -> None:
        from packager.core.fingerprint import file_sha256
        from packager.planning import PlanSettings, make_plan
        from packager.core.stats import RoutingStats

        plan_path.parent.mkdir(parents=True, exist_ok=True)
        stats = RoutingStats.load(stats_path)
        settings = PlanSettings(langs=pack.langs, direction=pack.direction, drop_ratio=drop, ranker=variant.ranker,
                                allocation=variant.allocation, uniform=variant.allocation == "uniform")
        provenance = {"command": command, "stats": {"path": str(stats_path), "sha256": file_sha256(stats_path)},
                      "pack": pack.name, "packager_version": __version__}
        make_plan(stats, settings, provenance).save(plan_path)
    return run


def _prune_runner(parent: Path, plan_path: Path, pruned_dir: Path):
    def run() -> None:
        from packager.prune import prune_checkpoint

        prune_checkpoint(parent, plan_path, pruned_dir, force=True, progress=True)
    return run


def _prune_gguf_runner(parent: Path, plan_path: Path, out_file: Path):
    def run() -> None:
        from converters.gguf.prune_gguf import prune_gguf

        out_file.parent.mkdir(parents=True, exist_ok=True)
        prune_gguf(parent, plan_path, out_file, force=True, progress=True)
    return run


def _bundle_runner(model_file: Path, metrics_path: Path, bundle_dir: Path, pack: PackSpec, config: BuildConfig):
    def run() -> None:
        from packager.bundle import make_bundle

        bundle_dir.parent.mkdir(parents=True, exist_ok=True)
        make_bundle(model_file, metrics_path, bundle_dir, directions=list(pack.pairs),
                    calibration_data=config.calibration_data, archive=config.archive, force=True)
    return run
