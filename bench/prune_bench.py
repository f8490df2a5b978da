"""`make bench-prune`: prune a synthetic multi-GB checkpoint with Qwen3-30B-A3B layer shapes.

Builds (once, outside git) a bf16 Qwen3-MoE checkpoint with the real per-layer shapes (hidden
2048, 128 experts of width 768, top-8, 32/4 heads of 128, vocab 151936) and fewer layers,
prunes 50% of the experts per layer with the real CLI in a child process, and compares with
`cp` of exactly the kept bytes (the pruned output directory) in the same run: same warm page
cache (inputs read once before each timed run), same fsync policy (every output file fsynced).
Peak memory of the pruner: anonymous RSS sampled from /proc (the < 1 GiB target) and total
peak RSS (VmHWM, includes reclaimable file pages). Writes bench/results/prune.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from runtime.memory import proc_status

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "prune.json"

# Qwen3-30B-A3B per-layer shapes (config.json of the published model)
SHAPES = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
              num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, intermediate_size=6144)
SHARD_BYTES = 2 * 1024**3
TARGET_RATIO = 0.8
TARGET_ANON_BYTES = 1024**3


def _config(n_layers: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": n_layers,
        "num_local_experts": SHAPES["num_experts"], **SHAPES, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "tie_word_embeddings": False,
        "hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645,
    }


def _tensors(n_layers: int) -> list[tuple[str, list[int]]]:
    """(name, shape) in checkpoint order, all bf16: non-expert tensors from the transformers model
    built on the meta device (no memory), experts in the on-disk per-expert layout of the arch data."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from packager.core.arch import load_arch

    config = _config(n_layers)
    arch = load_arch(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    expert_prefixes = tuple(arch.experts_module(layer_idx) + "." for layer_idx in range(n_layers))
    h, i = SHAPES["hidden_size"], SHAPES["moe_intermediate_size"]
    role_shapes = {"gate": [i, h], "up": [i, h], "down": [h, i]}
    out: list[tuple[str, list[int]]] = []
    for name, tensor in model.state_dict().items():
        if not name.startswith(expert_prefixes):
            out.append((name, list(tensor.shape)))
    for layer_idx in range(n_layers):
        for expert_idx in range(SHAPES["num_experts"]):
            for role, name in arch.expert_tensor_names(layer_idx, expert_idx).items():
                out.append((name, role_shapes[role]))
    return out


def _nbytes(shape: list[int]) -> int:
    n = 2
    for d in shape:
        n *= d
    return n


def normal_bf16_pattern(n_bytes: int = 64 * 1024**2, scale: float = 0.02) -> bytes:
    """bf16 values N(0, scale): a pattern a model can compute with (random bytes hold NaNs and
    denormals, fine for copying, not for running)."""
    import numpy as np

    values = np.random.default_rng(0).normal(0.0, scale, n_bytes // 2).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # truncation to bf16


def build_input(model_dir: Path, n_layers: int, values: str = "random-bytes") -> int:
    """Write the synthetic checkpoint shard by shard from a pattern buffer; returns bytes.
    values: 'random-bytes' (pruning, copying) or 'normal' (bf16 N(0, 0.02), for running it)."""
    marker = model_dir / "BENCH_INPUT.json"
    spec = {"n_layers": n_layers, "shapes": SHAPES, "shard_bytes": SHARD_BYTES, "version": 1}
    if values != "random-bytes":
        spec["values"] = values
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    pattern = random.Random(0).randbytes(64 * 1024**2) if values == "random-bytes" else normal_bf16_pattern()
    step = 4099 if values == "random-bytes" else 4098  # even steps keep bf16 values aligned
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in _tensors(n_layers):
        if shards[-1] and size + _nbytes(shape) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += _nbytes(shape)
    weight_map, total, cursor = {}, 0, 0
    for shard_idx, entries in enumerate(shards):
        file_name = f"model-{shard_idx + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in entries:
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + _nbytes(shape)]}
            weight_map[name] = file_name
            offset += _nbytes(shape)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(model_dir / file_name, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            remaining = offset
            while remaining:
                # rotate through the pattern so tensors differ; bf16 bit patterns are arbitrary values
                start = cursor % (len(pattern) - 4096)
                chunk = pattern[start:start + min(remaining, len(pattern) - start)]
                fh.write(chunk)
                remaining -= len(chunk)
                cursor += step
        total += offset
        print(f"  wrote {file_name} ({offset / 1e9:.2f} GB)", flush=True)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                         "weight_map": weight_map}))
    (model_dir / "config.json").write_text(json.dumps(_config(n_layers), indent=2))
    marker.write_text(json.dumps(spec))
    return total


def _read_all(directory: Path) -> None:
    """Bring a directory's files into the page cache (same warm state for every timed run)."""
    for path in sorted(directory.iterdir()):
        if path.is_file():
            with open(path, "rb", buffering=0) as fh:
                while fh.read(16 * 1024**2):
                    pass


def run_measured(cmd: list[str]) -> dict:
    """Run a child, sampling its RSS every 10 ms; wall time, peak anon / total RSS."""
    peaks = {"RssAnon": 0, "VmHWM": 0, "RssFile": 0}
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, value in proc_status(child.pid).items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = child.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({child.returncode}): {err.strip()[-2000:]}")
    return {"seconds": seconds, "peak_rss_anon_bytes": peaks["RssAnon"], "peak_rss_total_bytes": peaks["VmHWM"],
            "peak_rss_file_bytes": peaks["RssFile"], "stdout": out.strip()[-500:]}


_CP_FSYNC = """
import os, subprocess, sys
src, dst = sys.argv[1], sys.argv[2]
subprocess.run(["cp", "-r", "--reflink=never", src, dst], check=True)
for name in os.listdir(dst):
    fd = os.open(os.path.join(dst, name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "prune",
                        help="scratch directory for the synthetic checkpoint (outside git)")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (each ~1.25 GB)")
    parser.add_argument("--repeats", type=int, default=4, help="timed runs of each side (best is reported)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-files", action="store_true", help="keep the outputs after the run")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from packager import __version__
    from packager.core.checkpoint import atomic_write_json
    from packager.core.fingerprint import model_fingerprint
    from packager.core.plan_file import Plan

    layer_bytes = 3 * _nbytes([SHAPES["num_experts"], SHAPES["moe_intermediate_size"], SHAPES["hidden_size"]])
    input_estimate = args.layers * (layer_bytes + 40 * 1024**2) + 2 * _nbytes([SHAPES["vocab_size"], SHAPES["hidden_size"]])
    if input_estimate < 4 * 1000**3:
        parser.error(f"--layers {args.layers} gives {input_estimate / 1e9:.1f} GB; the benchmark needs >= 4 GB")
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, pruned_dir, cp_dir = args.work / "parent", args.work / "pruned", args.work / "cp-copy"
    for path in (pruned_dir, cp_dir):
        shutil.rmtree(path, ignore_errors=True)
    existing = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) if model_dir.exists() else 0
    needed = (input_estimate - existing) + 2 * input_estimate // 2 + 1024**3
    free = shutil.disk_usage(args.work).free
    if free < needed:
        print(f"error: {args.work}: needs {needed / 1e9:.1f} GB free, has {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    print(f"building synthetic input in {model_dir} (~{input_estimate / 1e9:.1f} GB)", flush=True)
    input_bytes = build_input(model_dir, args.layers)

    rng = random.Random(1)
    keep = {layer_idx: sorted(rng.sample(range(SHAPES["num_experts"]), SHAPES["num_experts"] // 2))
            for layer_idx in range(args.layers)}
    plan_path = Plan(model_fingerprint(model_dir), keep, {"ranker": "random", "drop_ratio": 0.5, "note": "benchmark"}
                     ).save(args.work / "plan.json")
    packager_bin = Path(sys.executable).parent / "packager"
    prune_cmd = ([str(packager_bin)] if packager_bin.exists() else [sys.executable, "-m", "packager.cli"])
    prune_cmd += ["prune", str(model_dir), "--plan", str(plan_path), "--out", str(pruned_dir)]
    baseline = run_measured([sys.executable, "-c", "import packager.prune, packager.cli"])

    prune_runs, cp_runs = [], []
    for repeat in range(args.repeats):
        # alternate which side runs first so neither always gets the fresher cache
        for side in (("prune", "cp") if repeat % 2 == 0 else ("cp", "prune")):
            if side == "prune":
                shutil.rmtree(pruned_dir, ignore_errors=True)
                _read_all(model_dir)
                os.sync()  # no dirty backlog from the previous run: both sides start flushed
                print(f"prune run {repeat + 1}", flush=True)
                prune_runs.append(run_measured(prune_cmd))
            else:
                if not pruned_dir.exists():  # cp needs the kept bytes as files: one untimed prune first
                    subprocess.run(prune_cmd, check=True, capture_output=True)
                shutil.rmtree(cp_dir, ignore_errors=True)
                _read_all(pruned_dir)
                os.sync()
                print(f"cp run {repeat + 1}", flush=True)
                cp_runs.append(run_measured([sys.executable, "-c", _CP_FSYNC, str(pruned_dir), str(cp_dir)]))
        shutil.rmtree(cp_dir, ignore_errors=True)

    provenance = json.loads((pruned_dir / "pruning.json").read_text())
    kept_bytes = provenance["output"]["tensor_bytes"]
    output_bytes = sum(p.stat().st_size for p in pruned_dir.iterdir() if p.is_file())
    best_prune = min(r["seconds"] for r in prune_runs)
    best_cp = min(r["seconds"] for r in cp_runs)
    peak_anon = max(r["peak_rss_anon_bytes"] for r in prune_runs)
    peak_total = max(r["peak_rss_total_bytes"] for r in prune_runs)
    result = {
        "benchmark": "prune", "created_unix": int(time.time()), "command": [sys.executable, "-m", "bench.prune_bench", *(argv or sys.argv[1:])],
        "input": {"dir": str(model_dir), "bytes": input_bytes, "layers": args.layers, "shapes": SHAPES,
                  "dtype": "bf16", "shards": len(list(model_dir.glob("*.safetensors")))},
        "plan": {"kept_experts_per_layer": SHAPES["num_experts"] // 2, "drop_ratio": 0.5},
        "output": {"bytes": output_bytes, "tensor_bytes": kept_bytes,
                   "shards": len(list(pruned_dir.glob("*.safetensors")))},
        "method": {"cache": "warm: inputs read once and os.sync() before every timed run (prune input, cp source); "
                            "sides alternate which runs first",
                   "fsync": "both sides fsync every output file and the directory",
                   "cp_baseline": "cp -r --reflink=never of the pruned output (exactly the kept bytes plus small files)",
                   "prune_includes": "process start, header parsing, fingerprint, validation, header hashes, copy, fsync, rename",
                   "rss": "child sampled every 10 ms from /proc/<pid>/status"},
        "prune_seconds": [r["seconds"] for r in prune_runs],
        "cp_seconds": [r["seconds"] for r in cp_runs],
        "prune_bytes_per_second": kept_bytes / best_prune,
        "cp_bytes_per_second": kept_bytes / best_cp,
        "throughput_ratio_vs_cp": best_cp / best_prune,
        "throughput_ratio_vs_cp_median_of_pairs": statistics.median(
            c["seconds"] / p["seconds"] for p, c in zip(prune_runs, cp_runs)),
        "throughput_ratio_vs_cp_all_runs": [c["seconds"] / p["seconds"] for p, c in zip(prune_runs, cp_runs)],
        "peak_rss_anon_bytes": peak_anon,
        "peak_rss_total_bytes": peak_total,
        "interpreter_baseline": {"peak_rss_anon_bytes": baseline["peak_rss_anon_bytes"],
                                 "peak_rss_total_bytes": baseline["peak_rss_total_bytes"]},
        "peak_rss_anon_above_baseline_bytes": peak_anon - baseline["peak_rss_anon_bytes"],
        "targets": {"throughput_ratio_vs_cp": TARGET_RATIO, "peak_rss_anon_bytes": TARGET_ANON_BYTES},
        "pass": {"throughput": best_cp / best_prune >= TARGET_RATIO, "memory": peak_anon < TARGET_ANON_BYTES},
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"packager": __version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    if not args.keep_files:
        for path in (pruned_dir, cp_dir):
            shutil.rmtree(path, ignore_errors=True)
    print(f"input {input_bytes / 1e9:.2f} GB, kept {kept_bytes / 1e9:.2f} GB; prune {best_prune:.1f}s, "
          f"cp {best_cp:.1f}s, ratio {best_cp / best_prune:.2f} (target >= {TARGET_RATIO}); "
          f"peak anon RSS {peak_anon / 2**20:.0f} MiB, total {peak_total / 2**20:.0f} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
