"""Sequential vs Ray `packager build` on one packs file (issue 21): wall time of each, the task
graph's total work and critical path (from the Ray run's task timings), what that gives on N
task slots, and whether the two runs wrote the same tensors and scores.

    python -m bench.ray_build_bench [--packs bench/ray_small.toml] [--cpus 2] [--out runs/bench-ray]

Each build starts in an empty run directory; results in bench/results/ray_build.json."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from packager.build import build
from runtime.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
SCORE_KEYS = ("chrf++", "bleu", "error_rate", "errors", "hit_token_limit", "n", "directions", "experts_kept", "per_layer")


def tensor_digest(path: Path) -> str:
    """sha256 over a model file's tensors (a GGUF's or ONNX file's metadata records its provenance)."""
    digest = hashlib.sha256()
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        for tensor in GGUFReader(path).tensors:
            digest.update(f"{tensor.name}|{tensor.tensor_type.name}|{list(tensor.shape)}".encode())
            digest.update(tensor.data.tobytes())
    elif path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        for init in onnx.load(str(path)).graph.initializer:
            digest.update(init.name.encode())
            digest.update(numpy_helper.to_array(init).tobytes())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def outputs(run_dir: Path) -> dict[str, str]:
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".gguf", ".onnx", ".safetensors")
             and "calibration" not in p.parts]
    return {p.relative_to(run_dir).as_posix(): tensor_digest(p) for p in sorted(files)}


def scores(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report" / "report.json").read_text())
    return {row["name"]: {k: row.get(k) for k in SCORE_KEYS} for rows in report["packs"].values() for row in rows["rows"]}


def timed_build(packs: Path, run_dir: Path, ray: str | None) -> tuple[dict, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.monotonic()
    record = build(packs, run_dir, command=f"bench.ray_build_bench {'--ray' if ray else ''}".strip(), ray=ray)
    return record, round(time.monotonic() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", type=Path, default=ROOT / "bench" / "ray_small.toml")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-ray")
    args = parser.parse_args()
    import ray

    load_before = os.getloadavg()
    seq, seq_wall = timed_build(args.packs, args.out / "seq", None)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        on_ray, ray_wall = timed_build(args.packs, args.out / "ray", "local")
    finally:
        ray.shutdown()
    work, critical = on_ray["timing"]["work_seconds"], on_ray["timing"]["critical_path_seconds"]
    result = {
        "packs_file": str(args.packs.relative_to(ROOT) if args.packs.is_relative_to(ROOT) else args.packs),
        "steps": len(seq["steps"]), "cpus": os.cpu_count(), "ray_cpus": args.cpus,
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "sequential": {"wall_seconds": seq_wall, **seq["timing"]},
        "ray": {"wall_seconds": ray_wall, **on_ray["timing"]},
        # a lower bound from the task timings: N task slots cannot beat the work spread evenly nor the longest chain
        "ray_lower_bound_seconds_by_slots": {n: round(max(work / n, critical), 1) for n in (1, 2, 4, 8, 16, 32)},
        "same_tensors": outputs(args.out / "seq") == outputs(args.out / "ray"),
        "same_scores": scores(args.out / "seq") == scores(args.out / "ray"),
        "slowest_steps": sorted(((s["seconds"], s["id"]) for s in on_ray["steps"]), reverse=True)[:8],
    }
    atomic_write_json(ROOT / "bench" / "results" / "ray_build.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
