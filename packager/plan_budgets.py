"""Budgets and settings of `packager plan search`, and what a plan costs: the size model of a
format (see packager.plan_search's docstring, "Sizes") and the RAM estimate."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from packager.core.errors import PackagerError

METADATA_ALLOWANCE = 16384
DEFAULT_RANKERS = ("routing-mass", "frequency", "reap")
DEFAULT_DROPS = (0.25, 0.5, 0.625, 0.75, 0.875)
PROXIES = ("kl", "nll")


class SearchError(PackagerError):
    """A search that cannot run or whose budgets no candidate meets."""


# ---- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budgets:
    size_format: str = "safetensors"        # "safetensors", "gguf:Q8_0", "onnx:int8", ...
    max_file_bytes: int | None = None
    max_ram_bytes: int | None = None
    min_drop: float | None = None           # --drop: drop at least this share of experts
    max_loss: float | None = None           # dev chrF++ below the parent
    ram_overhead_bytes: int = 0
    ctx_tokens: int = 512

    def any(self) -> bool:
        return any(v is not None for v in (self.max_file_bytes, self.max_ram_bytes, self.min_drop, self.max_loss))


@dataclass(frozen=True)
class SearchSettings:
    langs: tuple[str, ...]
    direction: str = "en-x"
    rankers: tuple[str, ...] = DEFAULT_RANKERS
    allocations: tuple[str, ...] = ("uniform", "dynamic", "inverted-dynamic")
    drops: tuple[float, ...] = DEFAULT_DROPS
    dev_n: int = 100
    batch_size: int = 32
    max_new_tokens: int = 256
    proxy: str = "kl"
    refine_steps: int = 8
    seed: int = 0
    threads: int = 1
    uniform: bool = False                   # uniform plans only (also implied by a GGUF size format)


def parse_size_budget(spec: str) -> tuple[str, int]:
    """'gguf:Q8_0=10' -> ('gguf:Q8_0', 10_000_000); 'safetensors=12.5' too. MB = 10^6 bytes."""
    fmt, sep, number = spec.rpartition("=")
    if not sep or not fmt:
        raise SearchError(f"--max-file-mb {spec!r}: write FORMAT:QUANT=MB, e.g. gguf:Q8_0=10 or onnx:int8=25")
    kind, quant = check_size_format(fmt)
    fmt = kind if quant is None else f"{kind}:{quant}"
    try:
        mb = float(number)
    except ValueError:
        raise SearchError(f"--max-file-mb {spec!r}: {number!r} is not a number of megabytes") from None
    if not mb > 0:
        raise SearchError(f"--max-file-mb {spec!r}: the size must be positive")
    return fmt, int(mb * 1_000_000)


def check_size_format(fmt: str) -> tuple[str, str | None]:
    if fmt == "safetensors":
        return fmt, None
    kind, sep, quant = fmt.partition(":")
    if kind == "gguf" and sep:
        from converters.gguf.quantize import QUANT_TYPES

        if quant.upper() in QUANT_TYPES + ("F32",):
            return kind, quant.upper()
        raise SearchError(f"size format {fmt!r}: unknown GGUF type {quant!r} (F32, {', '.join(QUANT_TYPES)})")
    if kind == "onnx" and sep:
        from converters.onnx.options import QUANT_TYPES as ONNX_QUANTS

        if quant in ONNX_QUANTS:
            return kind, quant
        raise SearchError(f"size format {fmt!r}: unknown ONNX quantization {quant!r} ({', '.join(ONNX_QUANTS)})")
    raise SearchError(f"size format {fmt!r}: use safetensors, gguf:<TYPE> (e.g. gguf:Q8_0) or onnx:<QUANT> (e.g. onnx:int8)")



# ---- sizes ---------------------------------------------------------------------------------------
@dataclass
class SizeModel:
    """Bytes of a plan's model file in one format (see the module docstring)."""

    size_format: str
    base: int                   # bytes with no routed expert (A)
    per_expert: float           # bytes per kept routed expert (B)
    allowance: int              # metadata allowance added to every prediction
    exact: bool                 # True when the prediction has no allowance (safetensors)
    references: dict = field(default_factory=dict)
    kv_bytes_per_token: int = 0

    def file_bytes(self, keep: dict[int, list[int]]) -> int:
        kept = sum(len(ids) for ids in keep.values())
        return int(round(self.base + self.per_expert * kept)) + self.allowance

    def ram_bytes(self, keep: dict[int, list[int]], budgets: Budgets) -> int:
        return self.file_bytes(keep) + self.kv_bytes_per_token * budgets.ctx_tokens + budgets.ram_overhead_bytes

    def to_dict(self) -> dict:
        return {"format": self.size_format, "base_bytes": self.base, "bytes_per_expert": self.per_expert,
                "metadata_allowance": self.allowance, "exact": self.exact, "references": self.references,
                "kv_bytes_per_token": self.kv_bytes_per_token}


def _kv_bytes_per_token(config: dict) -> int:
    heads = int(config.get("num_key_value_heads") or config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    return 2 * int(config["num_hidden_layers"]) * heads * head_dim * 4


def model_file_bytes(path: Path) -> int:
    """A GGUF file, or an ONNX export directory's model graph plus its external data."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path.stat().st_size
    directory = path.parent if path.is_file() else path
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.is_file() and (p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")))


def _export(kind: str, quant: str, model_dir: Path, out_dir: Path) -> Path:
    """One export of `model_dir` as `kind`/`quant` into `out_dir`; returns the model file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "gguf":
        from converters.gguf.export import export_gguf, quantized_path

        out_file = out_dir / "model.gguf"
        if quant in ("F32", "F16"):
            export_gguf(model_dir, out_file, None, dtype=quant.lower(), force=True, hash_inputs=False)
            return out_file
        export_gguf(model_dir, out_file, [quant], dtype="f16", force=True, hash_inputs=False)
        return quantized_path(out_file, quant)
    from converters.onnx.export import MODEL_FILE, export_onnx

    target = out_dir / quant
    export_onnx(model_dir, target, quant=quant, force=True, hash_inputs=False, check=False)
    return target / MODEL_FILE


def build_size_model(size_format: str, model_dir: Path, work_dir: Path, fingerprint: str, config: dict,
                     moe_layers: list[int], n_experts: int, top_k: int) -> SizeModel:
    """The size model of `size_format` for this parent (reference exports cached in work_dir)."""
    kind, quant = check_size_format(size_format)
    kv = _kv_bytes_per_token(config)
    if kind == "safetensors":
        from packager.core.plan_file import Plan
        from packager.prune import describe_prune

        full = describe_prune(model_dir, Plan(fingerprint, {i: list(range(n_experts)) for i in moe_layers}))["output_tensor_bytes"]
        low = describe_prune(model_dir, Plan(fingerprint, {i: list(range(top_k)) for i in moe_layers}))["output_tensor_bytes"]
        span = len(moe_layers) * (n_experts - top_k)
        per_expert = (full - low) / span
        return SizeModel(size_format, int(round(full - per_expert * len(moe_layers) * n_experts)), per_expert, 0, True,
                         {"parent_tensor_bytes": full, "top_k_tensor_bytes": low}, kv)
    cache = work_dir / "sizes" / f"{fingerprint[:16]}-{size_format.replace(':', '-')}.json"
    if cache.is_file():
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("fingerprint") == fingerprint and data.get("format") == size_format:
            return SizeModel(size_format, data["base"], data["per_expert"], METADATA_ALLOWANCE, False, data["references"], kv)
    import shutil

    from packager.core.plan_file import Plan
    from packager.prune import prune_checkpoint
    from runtime.atomic import atomic_write_json

    scratch = work_dir / "sizes" / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    full_file = _export(kind, quant, model_dir, scratch / "parent")
    low_dir = prune_checkpoint(model_dir, Plan(fingerprint, {i: list(range(top_k)) for i in moe_layers},
                                               meta={"purpose": "size reference"}), scratch / "top-k-model")
    low_file = _export(kind, quant, low_dir, scratch / "top-k")
    full, low = model_file_bytes(full_file), model_file_bytes(low_file)
    span = len(moe_layers) * (n_experts - top_k)
    per_expert = (full - low) / span
    base = full - per_expert * len(moe_layers) * n_experts
    references = {"parent_bytes": full, "top_k_bytes": low, "kept_experts": [len(moe_layers) * n_experts, len(moe_layers) * top_k]}
    atomic_write_json(cache, {"fingerprint": fingerprint, "format": size_format, "base": base, "per_expert": per_expert,
                              "references": references})
    shutil.rmtree(scratch, ignore_errors=True)
    return SizeModel(size_format, base, per_expert, METADATA_ALLOWANCE, False, references, kv)

