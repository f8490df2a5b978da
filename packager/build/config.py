"""The packs file (PACKS.toml, documented in packager/build/__init__.py): parse and check it."""
from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.core.errors import PackagerError

GGUF_BASE_TYPES = {"F16": "f16", "F32": "f32"}
FORMATS = ("gguf", "onnx")
ALLOCATIONS = ("uniform", "dynamic", "inverted-dynamic")
VARIANT_KEYS = ("format", "allocation", "ranker", "quant")
UNQUANTIZED_GGUF_TYPES = ("F32", "F16", "BF16")  # a GGUF parent of these types may be quantized further
# the module whose code writes a variant's files: format -> (Hugging Face parent, GGUF parent)
EXPORTERS = {"gguf": ("converters.gguf.export", "converters.gguf.quantize"), "onnx": ("converters.onnx.export", None)}
TOP_KEYS = {"parent", "drop_ratios", "budgets", "search", "ranker", "threads", "archive", "calibration", "verify", "variant",
            "pack", "profiles"}
CALIBRATION_KEYS = {"max_sentences", "teacher_forced", "max_new_tokens", "batch_size", "seed", "reap"}
# how a Hugging Face parent runs (packager.core.layer_stream): they change memory and speed, not results
EXECUTION_KEYS = {"dtype", "device", "execution", "expert_group_mb", "max_activation_mb", "spill_dir", "generator"}
# how calibration is cut into shards (tasks merged exactly by packager.core.stats.merge_stats)
SHARD_KEYS = {"shard_by", "slices"}
SHARD_BY = ("direction", "none")
VERIFY_KEYS = {"limit", "max_new_tokens", "bootstrap"}


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
    budgets: tuple = ()               # packager.pack_budgets.BudgetSpec: plans chosen by plan search


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
    shard_by: str = "direction"           # calibration shards: one per direction, or "none" (one run over all)
    slices: int = 1                       # ... each cut into this many interleaved slices of its sentences
    search: dict = field(default_factory=dict)   # [search]: plan search settings of the budgets (packager.pack_budgets)

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
    source = Path(path).resolve()
    try:
        raw = source.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path}: build file not found; see packs/demo.toml for an example") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"{path}: not valid TOML ({exc})") from None
    parent, parent_gguf_type = _parent(source, data.get("parent"))
    if parent_gguf_type is not None:
        _refuse_distillation(source, data, data.get("parent"))
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TOP_KEYS))}")
    packs = _read_packs(source, data)
    search = _read_search(source, data, packs, parent_gguf_type)
    variants = _read_variants(source, data, parent_gguf_type)
    calibration_data, calibration, shard_by, slices = _read_calibration(source, data)
    verify_settings = dict(data.get("verify", {}))
    test_file = _path(source, verify_settings.pop("test", None), "verify.test", "file")
    if set(verify_settings) - VERIFY_KEYS:
        raise _fail(source, f"[verify] unknown key(s) {', '.join(sorted(set(verify_settings) - VERIFY_KEYS))}")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise _fail(source, f"threads must be a positive integer, got {threads!r}")
    from packager.fit import PROFILES

    profiles = data.get("profiles", [])
    if not isinstance(profiles, list) or any(name not in PROFILES for name in profiles):
        raise _fail(source, f"profiles must be a list of device profiles ({', '.join(PROFILES)}), got {profiles!r}")
    return BuildConfig(source, parent, packs, variants, calibration_data, calibration, test_file, verify_settings,
                       threads, bool(data.get("archive", False)), hashlib.sha256(raw).hexdigest(), parent_gguf_type,
                       tuple(profiles), shard_by, slices, search)


def _drops_of(source: Path, value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) and 0 < v < 1 for v in value):
        raise _fail(source, f"{where} must be a non-empty list of ratios in (0, 1), got {value!r}")
    return tuple(sorted({float(v) for v in value}))


def _read_packs(source: Path, data: dict) -> list[PackSpec]:
    from packager.verify import VerifyError, parse_pair_list

    default_drops = data.get("drop_ratios", [0.5])
    _drops_of(source, default_drops, "drop_ratios")
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
        budgets = _budgets_of(source, item, data, where)
        drops = item.get("drop_ratios", data.get("drop_ratios", None if budgets else default_drops))
        packs.append(PackSpec(name, item["directions"], tuple(str(p) for p in pairs), langs, direction,
                              () if drops is None else _drops_of(source, drops, f"{where} drop_ratios"), budgets))
    if not packs:
        raise _fail(source, "no [[pack]]: add at least one, e.g. name = \"en-de\", directions = \"en->de\"")
    if len({p.name for p in packs}) != len(packs):
        raise _fail(source, "two packs have the same name")
    return packs


def _budgets_of(source: Path, item: dict, data: dict, where: str) -> tuple:
    """A pack's budgets (its own, else the file's): plans from packager plan search, besides or in place of drop ratios."""
    from packager.pack_budgets import parse_budgets
    from packager.plan_budgets import SearchError

    if "budgets" not in item and "budgets" not in data:
        return ()
    try:
        return parse_budgets(item.get("budgets", data.get("budgets")), f"{where} budgets")
    except SearchError as exc:
        raise _fail(source, str(exc)) from None


def _read_search(source: Path, data: dict, packs: list[PackSpec], parent_gguf_type: str | None) -> dict:
    from packager.pack_budgets import parse_search
    from packager.plan_budgets import SearchError

    if not any(p.budgets for p in packs):
        return {}
    if parent_gguf_type is not None:
        raise _fail(source, "budgets search plans in transformers: they need a Hugging Face parent")
    try:
        return parse_search(data.get("search"), source)
    except SearchError as exc:
        raise _fail(source, str(exc)) from None


def _read_variants(source: Path, data: dict, parent_gguf_type: str | None) -> list[Variant]:
    default_ranker = data.get("ranker", "routing-mass")
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
        variants.append(Variant(fmt, allocation, item.get("ranker", default_ranker),
                                _variant_quant(source, where, item, fmt, parent_gguf_type)))
    if not variants:
        raise _fail(source, "no [[variant]]: add e.g. format = \"gguf\", quant = [\"F16\"]")
    from packager.planning import RANKERS

    for variant in variants:
        if variant.ranker not in RANKERS:
            raise _fail(source, f"ranker {variant.ranker!r} is unknown; use one of {', '.join(RANKERS)}")
    return variants


def _variant_quant(source: Path, where: str, item: dict, fmt: str, parent_gguf_type: str | None) -> tuple[str, ...]:
    default_quant = [parent_gguf_type] if parent_gguf_type is not None else ["F16"] if fmt == "gguf" else ["fp32"]
    quant = item.get("quant", default_quant)
    if not isinstance(quant, list) or not quant or not all(isinstance(q, str) for q in quant):
        raise _fail(source, f"{where}: quant must be a list of quantization types, got {quant!r}")
    if parent_gguf_type is not None:
        quant = _gguf_parent_quant(source, where, quant, parent_gguf_type)
    elif fmt == "gguf" and sum(q.upper() in GGUF_BASE_TYPES for q in quant) > 1:
        raise _fail(source, f"{where}: give at most one of F16 / F32 (the unquantized export)")
    return tuple(quant)


def _read_calibration(source: Path, data: dict) -> tuple[list[Path], dict[str, Any], str, int]:
    """(data files, calibration settings, shard_by, slices) of the [calibration] table."""
    calibration = dict(data.get("calibration", {}))
    calibration_data = [_path(source, p, "calibration.data", "file") for p in calibration.pop("data", [])]
    if not calibration_data:
        raise _fail(source, "[calibration] data = [...] is required (harvest JSONL, e.g. data/harvest/dev.jsonl)")
    unknown = set(calibration) - CALIBRATION_KEYS - EXECUTION_KEYS - SHARD_KEYS
    if unknown:
        raise _fail(source, f"[calibration] unknown key(s) {', '.join(sorted(unknown))}")
    if str(data.get("parent", "")).lower().endswith(".gguf") and set(calibration) & EXECUTION_KEYS:
        raise _fail(source, f"[calibration] {', '.join(sorted(set(calibration) & EXECUTION_KEYS))}: only for a Hugging Face "
                            "parent (a GGUF parent runs in llama.cpp in its own tensor types)")
    shard_by, slices = calibration.pop("shard_by", "direction"), calibration.pop("slices", 1)
    if shard_by not in SHARD_BY:
        raise _fail(source, f"[calibration] shard_by must be one of {', '.join(SHARD_BY)}, got {shard_by!r}")
    max_sentences = calibration.get("max_sentences", 200)
    if not isinstance(slices, int) or isinstance(slices, bool) or slices < 1 or (max_sentences and slices > max_sentences):
        raise _fail(source, f"[calibration] slices must be an integer from 1 to max_sentences ({max_sentences}), got {slices!r}")
    if "expert_group_mb" in calibration:
        calibration["expert_group_bytes"] = int(calibration.pop("expert_group_mb")) * 1024**2
    for key, kind in (("spill_dir", "dir"), ("generator", "file")):
        if key in calibration:
            calibration[key] = str(_path(source, calibration[key], f"calibration.{key}", kind))
    return calibration_data, calibration, shard_by, slices


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
