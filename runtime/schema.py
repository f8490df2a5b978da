"""The one versioned schema for what `packager export` writes next to a model (ExportConfig)
and what `packager bundle` ships (BundleManifest = export config + metrics, licenses, sha256
of every file, minimum RAM).

Both are JSON objects with `schema_version` and `kind`. Paths inside are relative to the JSON
file's directory (POSIX separators, never absolute, never `..`). Unknown keys are refused so
that a typo does not pass silently; format-specific details go into `extra`.
"""
from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from runtime.atomic import atomic_write_json
from runtime.errors import SchemaError

SCHEMA_VERSION = 1
FORMATS = ("gguf", "onnx")
EXPORT_KIND = "export_config"
BUNDLE_KIND = "bundle_manifest"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fail(source: str, message: str) -> SchemaError:
    return SchemaError(f"{source}: {message}")


def _check_type(source: str, key: str, value: Any, kind: type | tuple, what: str) -> None:
    # bool is an int in Python: refuse it where a count is expected
    if isinstance(value, bool) and kind in (int, (int, float)):
        raise _fail(source, f"field {key!r} must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise _fail(source, f"field {key!r} must be {what}, got {type(value).__name__} {value!r}"[:300])


def _check_relpath(source: str, key: str, value: Any) -> None:
    _check_type(source, key, value, str, "a relative path")
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise _fail(source, f"field {key!r} must be a relative path inside the bundle, got {value!r}")


@dataclass
class ExportConfig:
    """Written by `packager export` next to the model file(s)."""

    format: str
    model_files: list[str]
    family: str
    prompt_template: str
    stop_tokens: list[str]
    top_k: int
    n_experts: dict[int, int]
    quantization: dict[str, Any]
    provenance: dict[str, Any]
    special_tokens: dict[str, str] = field(default_factory=dict)
    tokenizer: str | None = None
    languages: list[str] = field(default_factory=list)
    parent_n_experts: int | None = None
    parent_fingerprint: str | None = None
    plan: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    kind: str = EXPORT_KIND

    KIND: ClassVar[str] = EXPORT_KIND

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self, source: str = "export config") -> None:
        if self.schema_version != SCHEMA_VERSION:
            newer = isinstance(self.schema_version, int) and self.schema_version > SCHEMA_VERSION
            hint = "upgrade edge-translation-packager" if newer else "re-export the model"
            raise _fail(source, f"schema_version {self.schema_version!r} is not supported (this version reads {SCHEMA_VERSION}); {hint}")
        if self.kind != self.KIND:
            raise _fail(source, f"kind is {self.kind!r}, expected {self.KIND!r}")
        if self.format not in FORMATS:
            raise _fail(source, f"field 'format' must be one of {', '.join(FORMATS)}, got {self.format!r}")
        _check_type(source, "model_files", self.model_files, list, "a non-empty list of relative paths")
        if not self.model_files:
            raise _fail(source, "field 'model_files' is empty: the config must name the model file")
        for item in self.model_files:
            _check_relpath(source, "model_files", item)
        if self.tokenizer is not None:
            _check_relpath(source, "tokenizer", self.tokenizer)
        _check_type(source, "family", self.family, str, "a string")
        _check_type(source, "prompt_template", self.prompt_template, str, "a string")
        if not self.prompt_template.strip():
            raise _fail(source, "field 'prompt_template' is empty: export the model with its chat template")
        _check_type(source, "stop_tokens", self.stop_tokens, list, "a list of strings")
        if not self.stop_tokens or not all(isinstance(t, str) and t for t in self.stop_tokens):
            raise _fail(source, "field 'stop_tokens' must be a non-empty list of token strings")
        _check_type(source, "special_tokens", self.special_tokens, dict, "an object of name -> token")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.special_tokens.items()):
            raise _fail(source, "field 'special_tokens' must map names to token strings")
        _check_type(source, "top_k", self.top_k, int, "a positive integer")
        if self.top_k < 1:
            raise _fail(source, f"field 'top_k' must be >= 1, got {self.top_k}")
        _check_type(source, "n_experts", self.n_experts, dict, "an object layer index -> expert count")
        if not self.n_experts:
            raise _fail(source, "field 'n_experts' is empty: list the expert count of every MoE layer")
        for layer_idx, count in self.n_experts.items():
            if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
                raise _fail(source, f"field 'n_experts' has a bad layer index {layer_idx!r}")
            _check_type(source, f"n_experts[{layer_idx}]", count, int, "an integer")
            if count < self.top_k:
                raise _fail(source, f"layer {layer_idx} has {count} experts, fewer than top_k={self.top_k}")
        if self.parent_n_experts is not None:
            _check_type(source, "parent_n_experts", self.parent_n_experts, int, "an integer")
            if self.parent_n_experts < max(self.n_experts.values()):
                raise _fail(source, "field 'parent_n_experts' is smaller than a layer's expert count")
        _check_type(source, "quantization", self.quantization, dict, "an object with a 'type'")
        if not isinstance(self.quantization.get("type"), str):
            raise _fail(source, "field 'quantization' needs a 'type' string such as 'F32' or 'Q4_K_M'")
        _check_type(source, "provenance", self.provenance, dict, "an object")
        _check_type(source, "languages", self.languages, list, "a list of language codes")
        if self.languages:
            from runtime.languages import parse_language
            from runtime.errors import LanguageError

            for code in self.languages:
                try:
                    if not isinstance(code, str) or parse_language(code).code != code:
                        raise LanguageError(f"{code!r} is not a canonical language code")
                except LanguageError as exc:
                    raise _fail(source, f"field 'languages': {exc}") from None
        if self.parent_fingerprint is not None and not (
            isinstance(self.parent_fingerprint, str) and _SHA256.match(self.parent_fingerprint)
        ):
            raise _fail(source, f"field 'parent_fingerprint' must be 64 lower-case hex digits, got {self.parent_fingerprint!r}")
        if self.plan is not None:
            _check_type(source, "plan", self.plan, dict, "an object")
        _check_type(source, "extra", self.extra, dict, "an object")

    # -- (de)serialisation ------------------------------------------------------------------
    @property
    def uniform_n_experts(self) -> int | None:
        counts = set(self.n_experts.values())
        return counts.pop() if len(counts) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["n_experts"] = {str(k): v for k, v in sorted(self.n_experts.items())}
        ordered = {"schema_version": data.pop("schema_version"), "kind": data.pop("kind")}
        ordered.update(data)
        return ordered

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>"):
        if not isinstance(data, dict):
            raise _fail(source, f"expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if "schema_version" not in data:
            raise _fail(source, "missing 'schema_version': not an export config or bundle manifest")
        if data.get("kind") != cls.KIND:
            raise _fail(source, f"kind is {data.get('kind')!r}, expected {cls.KIND!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise _fail(source, f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
        required = {f.name for f in fields(cls) if f.default is f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise _fail(source, f"missing field(s) {', '.join(map(repr, missing))}")
        counts = data.get("n_experts")
        if isinstance(counts, dict):
            try:
                data["n_experts"] = {int(k): v for k, v in counts.items()}
            except ValueError:
                raise _fail(source, f"field 'n_experts' keys must be layer indices, got {sorted(counts)}") from None
        obj = cls.__new__(cls)
        for f in fields(cls):
            if f.name in data:
                value = data[f.name]
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(obj, f.name, value)
        obj.validate(source)
        return obj

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _fail(str(path), f"file not found; expected the {cls.KIND.replace('_', ' ')} JSON") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _fail(str(path), f"not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> Path:
        self.validate(str(path))
        return atomic_write_json(path, self.to_dict())

    def model_paths(self, base_dir: str | Path) -> list[Path]:
        return [Path(base_dir) / item for item in self.model_files]


@dataclass
class BundleManifest(ExportConfig):
    """The export config plus what `packager bundle` measured and hashed."""

    metrics: dict[str, Any] = field(default_factory=dict)
    licenses: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    min_ram_bytes: int = 0
    directions: list[str] = field(default_factory=list)  # "en->de": what edge-translate accepts
    kind: str = BUNDLE_KIND

    KIND: ClassVar[str] = BUNDLE_KIND

    def validate(self, source: str = "bundle manifest") -> None:
        super().validate(source)
        _check_type(source, "metrics", self.metrics, dict, "an object")
        _check_type(source, "licenses", self.licenses, list, "a list of objects")
        if not all(isinstance(item, dict) for item in self.licenses):
            raise _fail(source, "field 'licenses' must be a list of objects")
        _check_type(source, "files", self.files, dict, "an object path -> {sha256, bytes}")
        for name, entry in self.files.items():
            _check_relpath(source, "files", name)
            if not isinstance(entry, dict) or not _SHA256.match(str(entry.get("sha256", ""))):
                raise _fail(source, f"files[{name!r}] needs a 'sha256' of 64 lower-case hex digits")
            size = entry.get("bytes")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise _fail(source, f"files[{name!r}] needs 'bytes' as a non-negative integer")
        for item in self.model_files + ([self.tokenizer] if self.tokenizer else []):
            if self.files and item not in self.files:
                raise _fail(source, f"{item!r} is not listed in 'files' with its sha256")
        _check_type(source, "min_ram_bytes", self.min_ram_bytes, int, "an integer")
        if self.min_ram_bytes < 0:
            raise _fail(source, "field 'min_ram_bytes' must be >= 0")
        _check_type(source, "directions", self.directions, list, "a list of directions like 'en->de'")
        if self.directions:
            from runtime.errors import LanguageError
            from runtime.languages import parse_pair

            for item in self.directions:
                try:
                    if not isinstance(item, str) or str(parse_pair(item)) != item:
                        raise LanguageError(f"{item!r} is not a canonical direction such as 'en->de'")
                except LanguageError as exc:
                    raise _fail(source, f"field 'directions': {exc}") from None

    @classmethod
    def from_export(cls, config: ExportConfig, **bundle_fields) -> "BundleManifest":
        data = config.to_dict()
        data["kind"] = BUNDLE_KIND
        data.update(bundle_fields)
        return cls.from_dict(data, source="bundle manifest")

    def export_config(self) -> ExportConfig:
        data = self.to_dict()
        for name in ("metrics", "licenses", "files", "min_ram_bytes", "directions"):
            data.pop(name)
        data["kind"] = EXPORT_KIND
        return ExportConfig.from_dict(data, source="bundle manifest")


def load_model_config(path: str | Path) -> ExportConfig:
    """Either kind, chosen by its `kind` field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(str(path), "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(str(path), f"not valid JSON ({exc})") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    cls = {EXPORT_KIND: ExportConfig, BUNDLE_KIND: BundleManifest}.get(kind)
    if cls is None:
        raise _fail(str(path), f"kind is {kind!r}, expected {EXPORT_KIND!r} or {BUNDLE_KIND!r}")
    return cls.from_dict(data, source=str(path))
