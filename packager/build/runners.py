"""What each step of the build runs: functions of files to files, reading and writing only the
run directory (and the parent and data named in the packs file), so any machine that sees the
same paths can run them."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from packager import __version__
from packager.build.config import GGUF_BASE_TYPES, BuildConfig, BuildError, PackSpec, Variant


def calibrate_runner(config: BuildConfig, pairs: Sequence[str], data_slice: tuple[int, int] | None, out: Path,
                     command: str | None):
    """Calibrate the parent on `pairs` (one shard: its directions, its slice of their sentences)."""
    def run() -> None:
        from runtime.languages import parse_pair

        out.parent.mkdir(parents=True, exist_ok=True)
        slugs = tuple(parse_pair(p).slug for p in pairs)
        if config.gguf_parent:  # inside llama.cpp: neither torch nor transformers
            from packager.calibrate_gguf import calibrate_gguf
            from packager.calibration_data import CalibrationSettings

            settings = CalibrationSettings(pairs=slugs, data_slice=data_slice, **config.calibration)
            stats = calibrate_gguf(config.parent, config.calibration_data, settings, command=command, show_progress=True,
                                   n_threads=config.threads)
        else:
            from packager.calibrate import CalibrationSettings, calibrate

            settings = CalibrationSettings(pairs=slugs, data_slice=data_slice, **config.calibration)
            stats = calibrate(config.parent, config.calibration_data, settings, command=command, show_progress=True)
        stats.save(out)
    return run


def merge_runner(shards: Sequence[Path], out: Path):
    """The shards' statistics added up (exact: sums and counts), as `packager stats merge`."""
    def run() -> None:
        from packager.core.stats import RoutingStats, merge_stats

        merge_stats([RoutingStats.load(p) for p in shards]).save(out)
    return run


def plan_runner(stats_path: Path, plan_path: Path, pack: PackSpec, drop: float, variant: Variant, command):
    def run() -> None:
        from packager.core.fingerprint import file_sha256
        from packager.core.stats import RoutingStats
        from packager.planning import PlanSettings, make_plan

        plan_path.parent.mkdir(parents=True, exist_ok=True)
        stats = RoutingStats.load(stats_path)
        settings = PlanSettings(langs=pack.langs, direction=pack.direction, drop_ratio=drop, ranker=variant.ranker,
                                allocation=variant.allocation, uniform=variant.allocation == "uniform")
        provenance = {"command": command, "stats": {"path": str(stats_path), "sha256": file_sha256(stats_path)},
                      "pack": pack.name, "packager_version": __version__}
        make_plan(stats, settings, provenance).save(plan_path)
    return run


def budget_plan_inputs(config: BuildConfig, pack: PackSpec, budget) -> dict:
    from packager.pack_budgets import plan_inputs

    return plan_inputs(budget, config.search, pack.langs, pack.direction, _uniform_only(config))


def _uniform_only(config: BuildConfig) -> bool:
    return any(v.format == "gguf" for v in config.variants)   # stock llama.cpp loads one expert count


def budget_plan_runner(config: BuildConfig, stats_path: Path, plan_path: Path, pack: PackSpec, budget, command):
    """The plan step of a budget: packager.pack_budgets runs the plan search and writes the chosen plan."""
    def run() -> None:
        from packager.pack_budgets import search_plan

        search_plan(stats_path, plan_path, config.parent, pack.langs, pack.direction, budget, config.search,
                    _uniform_only(config), config.threads, command)
    return run


def prune_runner(parent: Path, plan_path: Path, pruned_dir: Path):
    def run() -> None:
        from packager.prune import prune_checkpoint

        prune_checkpoint(parent, plan_path, pruned_dir, force=True, progress=True)
    return run


def prune_gguf_runner(parent: Path, plan_path: Path, out_file: Path):
    def run() -> None:
        from converters.gguf.prune_gguf import prune_gguf

        out_file.parent.mkdir(parents=True, exist_ok=True)
        prune_gguf(parent, plan_path, out_file, force=True, progress=True)
    return run


def verify_runner(config: BuildConfig, settings: dict, model: Path, out: Path, pairs: Sequence[str], labels: dict,
                  parent_metrics: Path | None, command: str | None):
    def run() -> None:
        from packager.verify import verify

        out.parent.mkdir(parents=True, exist_ok=True)
        verify(model, config.test_file, list(pairs), out, limit=settings["limit"],
               max_new_tokens=settings["max_new_tokens"], n_bootstrap=settings["n_bootstrap"],
               threads=config.threads, parent_metrics=parent_metrics, labels=labels, command=command)
    return run


def bundle_runner(model_file: Path, metrics_path: Path, bundle_dir: Path, pack: PackSpec, config: BuildConfig):
    def run() -> None:
        from packager.bundle import make_bundle

        bundle_dir.parent.mkdir(parents=True, exist_ok=True)
        make_bundle(model_file, metrics_path, bundle_dir, directions=list(pack.pairs),
                    calibration_data=config.calibration_data, archive=config.archive, force=True)
    return run


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
