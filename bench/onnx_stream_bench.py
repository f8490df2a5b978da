"""Streamed ONNX export benchmark (part of `make bench`): time and peak memory of `packager
export onnx` at fp32, fp16 and int4 on the 50%-pruned child of the synthetic Qwen3-30B-A3B-
shaped checkpoint, next to `packager export gguf` (F16) on the same input in the same run.

1. bench.prune_bench.build_input writes the synthetic bf16 parent (4 layers of Qwen3-30B-A3B
   shapes, N(0, 0.02) values, about 5.8 GB) and `packager prune` keeps a random 50% of the
   experts of every layer (about 3.8 GB), plus a byte-level BPE tokenizer.
2. Each export runs the real CLI in a child process sampled every 10 ms from /proc (peak
   RssAnon and VmHWM); the page cache is warmed once before the first export. Exports run with
   --no-hash; ONNX exports skip the transformers comparison by themselves (the model is above
   the comparison's budget; recorded in each export config).
3. Targets (issue 15): peak RSS <= 2 GiB at every precision, time <= 1.5x `export gguf`.

Needs about 16 GB of disk (parent, child, one export at a time) and is skipped when less is
free or when less than 4 GiB of RAM is available. Files are deleted afterwards unless --keep.
Results: bench/results/onnx_stream.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "onnx_stream.json"
WORK = REPO / "data" / "bench" / "onnx_stream"
LAYERS = 4
PRECISIONS = (("fp32", ["--dtype", "fp32"]), ("fp16", ["--dtype", "fp16"]), ("int4", ["--quant", "int4"]))
RSS_TARGET_BYTES = 2 * 1024**3
TIME_TARGET_RATIO = 1.5


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_child(work: Path, layers: int) -> tuple[Path, int, int]:
    """(pruned child dir, parent bytes, child bytes)."""
    from bench.gguf_bench import _packager, _write_bpe
    from bench.prune_bench import SHAPES, build_input
    from packager.core.fingerprint import model_fingerprint
    from packager.core.plan_file import Plan

    parent = work / "parent"
    parent_bytes = build_input(parent, layers, values="normal")
    child = work / "child"
    if not (child / "config.json").is_file():
        rng = random.Random(1)
        keep = {layer_idx: sorted(rng.sample(range(SHAPES["num_experts"]), SHAPES["num_experts"] // 2))
                for layer_idx in range(layers)}
        plan = Plan(model_fingerprint(parent), keep, {"ranker": "random", "drop_ratio": 0.5, "note": "benchmark"})
        plan_path = plan.save(work / "plan.json")
        import subprocess

        subprocess.run(_packager() + ["prune", str(parent), "--plan", str(plan_path), "--out", str(child)], check=True,
                       capture_output=True)
    _write_bpe(child)
    child_bytes = sum(p.stat().st_size for p in child.glob("*.safetensors"))
    return child, parent_bytes, child_bytes


def main(argv: list[str] | None = None) -> int:
    from bench.gguf_bench import _measured, _packager

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and exports")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "onnx_stream", "created_unix": int(time.time()),
                    "command": [sys.executable, "-m", "bench.onnx_stream_bench", *(argv if argv is not None else sys.argv[1:])],
                    "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    free_disk = shutil.disk_usage(args.work).free
    needed = args.layers * 4.2e9
    available = _available_ram()
    if free_disk < needed or available < 4 * 1024**3:
        result["skipped"] = (f"needs {needed / 1e9:.0f} GB disk and 4 GiB available RAM; has {free_disk / 1e9:.0f} GB "
                             f"and {available / 1024**3:.1f} GiB")
        print(result["skipped"], file=sys.stderr)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2))
        return 0
    try:
        child, parent_bytes, child_bytes = build_child(args.work, args.layers)
        for path in sorted(child.glob("*.safetensors")):  # warm cache, same state for every export
            with open(path, "rb", buffering=0) as handle:
                while handle.read(16 * 1024**2):
                    pass
        baseline = _measured([sys.executable, "-c", "import packager.cli, converters.onnx.export, onnx, torch, transformers"])
        result.update({"parent_bytes": parent_bytes, "child_bytes": child_bytes, "layers": args.layers,
                       "baseline_import": baseline, "exports": {}})
        gguf = args.work / "child.f16.gguf"
        run = _measured(_packager() + ["export", "gguf", str(child), "--out", str(gguf), "--dtype", "f16", "--no-hash", "--force"])
        result["exports"]["gguf_f16"] = {**run, "bytes": gguf.stat().st_size}
        gguf.unlink()
        gguf.with_name(gguf.stem + ".export.json").unlink(missing_ok=True)
        for name, flags in PRECISIONS:
            out = args.work / f"child.{name}.onnx"
            run = _measured(_packager() + ["export", "onnx", str(child), "--out", str(out), "--no-hash", "--force", *flags])
            config = json.loads((out / "model.export.json").read_text())
            result["exports"][f"onnx_{name}"] = {**run, "bytes": _dir_bytes(out),
                                                 "export_check": config["extra"].get("export_check")}
            shutil.rmtree(out)
            print(f"onnx {name}: {run['seconds']:.1f} s, peak RSS {run['peak_rss_total_bytes'] / 1024**3:.2f} GiB", file=sys.stderr)
        gguf_seconds = result["exports"]["gguf_f16"]["seconds"]
        for entry in result["exports"].values():
            entry["peak_rss_total_fraction_of_child"] = entry["peak_rss_total_bytes"] / child_bytes
            entry["peak_rss_anon_fraction_of_child"] = entry["peak_rss_anon_bytes"] / child_bytes
            entry["seconds_ratio_to_gguf"] = entry["seconds"] / gguf_seconds
        onnx_runs = [v for k, v in result["exports"].items() if k.startswith("onnx_")]
        result["targets"] = {
            "peak_rss_total_bytes_max": RSS_TARGET_BYTES,
            "peak_rss_met": all(v["peak_rss_total_bytes"] <= RSS_TARGET_BYTES for v in onnx_runs),
            "seconds_ratio_to_gguf_max": TIME_TARGET_RATIO,
            "time_met": all(v["seconds_ratio_to_gguf"] <= TIME_TARGET_RATIO for v in onnx_runs),
        }
        result["method"] = {"rss": "child process sampled every 10 ms from /proc/<pid>/status: peak RssAnon and VmHWM",
                            "export": "the packager CLI in a child process, including interpreter start and imports"}
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: {"seconds": round(v["seconds"], 1), "peak_rss_gib": round(v["peak_rss_total_bytes"] / 1024**3, 2)}
                      for k, v in result.get("exports", {}).items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
