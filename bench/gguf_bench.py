"""GGUF benchmark (part of `make bench`): export time, peak memory and file size per quant type.

1. The embedded default model (models/default), pruned to half its experts with a uniform
   plan (random expert choice: speed and size do not depend on which experts are kept):
   export F32 and F16 with the real CLI in a child process, quantize to each type with
   llama.cpp's quantizer, and record file sizes, times, and the logit divergence of each
   quant type against the F32 file on harvested test sentences (same tokens, llama.cpp).
2. A multi-GB synthetic checkpoint (the prune benchmark's bf16 Qwen3-30B-A3B-shaped input,
   linked, plus a byte-level BPE tokenizer): export to F16 in a child process.

Memory: the child's peak anonymous RSS (sampled from /proc every 10 ms) and peak total RSS
(VmHWM, includes memory-mapped file pages, which are reclaimable), next to an interpreter
baseline (the same imports, no work). Writes bench/results/gguf.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "gguf.json"
DEFAULT_MODEL = REPO / "models" / "default"
QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>"]


def _packager() -> list[str]:
    binary = Path(sys.executable).parent / "packager"
    return [str(binary)] if binary.exists() else [sys.executable, "-m", "packager.cli"]


def _measured(cmd: list[str]) -> dict:
    from bench.prune_bench import run_measured

    result = run_measured(cmd)
    result.pop("stdout", None)
    return result


def _test_sentences(limit: int, accept=lambda record: True) -> list[tuple[str, str, str]]:
    """(source language, target language, source) of the first `limit` accepted harvest test records."""
    path = REPO / "data" / "harvest" / "test.jsonl"
    rows = []
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if accept(record):
                    rows.append((record["src_lang"], record["tgt_lang"], record["src"]))
                if len(rows) >= limit:
                    break
    return rows


def _divergence(reference_file: Path, quant_files: dict[str, Path], sentences) -> dict:
    """Max and mean absolute logit difference against the F32 file, and top-1 agreement."""
    import numpy as np

    from runtime.backends import open_backend

    with open_backend(reference_file, n_threads=2, parity=True) as backend:
        prompts = [backend.prompt_ids(text, src, tgt) for src, tgt, text in sentences]
        reference = [backend.logits(ids) for ids in prompts]
    out = {}
    for quant_type, path in quant_files.items():
        with open_backend(path, n_threads=2) as backend:
            diffs, agree, total = [], 0, 0
            for ids, ref in zip(prompts, reference):
                logits = backend.logits(ids)
                diffs.append(np.abs(logits - ref))
                agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
                total += len(ids)
        out[quant_type] = {"max_abs_logit_diff": float(max(d.max() for d in diffs)),
                           "mean_abs_logit_diff": float(np.mean([d.mean() for d in diffs])),
                           "top1_agreement": agree / total}
    return out


def bench_default(work: Path, quants: tuple[str, ...], n_sentences: int, model: Path = DEFAULT_MODEL) -> dict:
    if not (model / "config.json").is_file():
        return {"skipped": f"{model} does not exist yet (the default model is trained by `make train-default`)"}
    from packager.core.arch import load_arch
    from packager.core.fingerprint import model_fingerprint
    from packager.core.plan_file import Plan
    from packager.prune import prune_checkpoint

    config = json.loads((model / "config.json").read_text())
    arch = load_arch(config)
    n_experts = arch.n_experts(config)
    rng = random.Random(0)
    keep = {layer_idx: sorted(rng.sample(range(n_experts), n_experts // 2)) for layer_idx in arch.moe_layers(config)}
    plan = Plan(model_fingerprint(model), keep, {"ranker": "random", "allocation": "uniform", "drop_ratio": 0.5,
                                                          "note": "gguf benchmark"})
    pruned = work / "default-pruned"
    shutil.rmtree(pruned, ignore_errors=True)
    prune_checkpoint(model, plan, pruned)

    result = {"model": str(model), "model_bytes": sum(p.stat().st_size for p in model.glob("*.safetensors")), "plan": {"kept_experts_per_layer": n_experts // 2, "of": n_experts},
              "checkpoint_bytes": sum(p.stat().st_size for p in pruned.glob("*.safetensors")), "exports": {}}
    for dtype in ("f32", "f16"):
        out = work / f"default-pruned.{dtype}.gguf"
        run = _measured(_packager() + ["export", "gguf", str(pruned), "--out", str(out), "--dtype", dtype, "--force"])
        result["exports"][dtype.upper()] = {**run, "bytes": out.stat().st_size}
    quant_files = {}
    for quant_type in quants:
        from converters.gguf.quantize import quantize_gguf

        started = time.perf_counter()
        path = quantize_gguf(work / "default-pruned.f32.gguf", work / f"default-pruned.{quant_type}.gguf", quant_type, force=True)
        seconds = time.perf_counter() - started
        report = json.loads(path.with_name(path.stem + ".export.json").read_text())["quantization"]
        result["exports"][quant_type] = {"seconds": seconds, "bytes": path.stat().st_size,
                                         "fallback_tensors": len(report["fallbacks"]), "tensor_types": report["tensor_types"]}
        quant_files[quant_type] = path
    sentences = _test_sentences(n_sentences)
    if sentences:
        quant_files = {"F16": work / "default-pruned.f16.gguf", **quant_files}
        result["logit_divergence_vs_f32"] = _divergence(work / "default-pruned.f32.gguf", quant_files, sentences)
        result["logit_divergence_prompts"] = len(sentences)
    return result


def _write_bpe(model_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([s for _, _, s in _test_sentences(2000)] or ["benchmark text"] * 10, trainer)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                                                                "pad_token": "<|pad|>"}))
    (model_dir / "chat_template.jinja").write_text(
        "<|bos|>{{ source_lang }}>{{ target_lang }}:{{ messages[0]['content'] }}<|sep|>")


def build_synthetic(model_dir: Path, layers: int) -> int:
    """bf16 checkpoint with the prune benchmark's Qwen3-30B-A3B layer shapes, filled with
    N(0, 0.02) values (random bit patterns would be NaN/denormal-heavy and make the float
    conversions unrealistically slow). Built once; returns the tensor bytes."""
    import numpy as np

    from bench.prune_bench import SHAPES, _config, _tensors
    from packager.core.checkpoint import CheckpointWriter

    marker = model_dir / "BENCH_INPUT.json"
    spec = {"layers": layers, "shapes": SHAPES, "values": "bf16 N(0, 0.02)", "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    shutil.rmtree(model_dir, ignore_errors=True)
    values = (np.random.default_rng(0).standard_normal(16 * 1024**2, dtype=np.float32) * 0.02)
    pattern = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # 32 MiB of bf16
    total, cursor = 0, 0
    with CheckpointWriter(model_dir, max_shard_bytes=2 * 1024**3, force=True) as writer:
        for name, shape in _tensors(layers):
            nbytes = 2 * int(np.prod(shape))
            start = 2 * (cursor % (len(pattern) // 4))  # even offset: whole bf16 values
            if start + nbytes <= len(pattern):
                data = pattern[start:start + nbytes]
            else:
                data = (pattern[start:] + pattern * (nbytes // len(pattern) + 1))[:nbytes]
            writer.add_bytes(name, "BF16", shape, data)
            cursor += 4098
            total += nbytes
        writer.finalize()
    (model_dir / "config.json").write_text(json.dumps(_config(layers), indent=2))
    marker.write_text(json.dumps(spec))
    return total


def bench_synthetic(work: Path, layers: int, keep_files: bool) -> dict:
    from bench.prune_bench import SHAPES

    source = work / "synthetic-input"
    free = shutil.disk_usage(work).free
    estimate = layers * 1.35e9 + 1.3e9
    if free < 2.2 * estimate:
        return {"skipped": f"{work}: needs about {2.2 * estimate / 1e9:.1f} GB free, has {free / 1e9:.1f} GB"}
    input_bytes = build_synthetic(source, layers)
    model_dir = work / "synthetic"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix == ".safetensors" or path.name == "model.safetensors.index.json":
            (model_dir / path.name).symlink_to(path)
    shutil.copy(source / "config.json", model_dir / "config.json")
    _write_bpe(model_dir)
    out = work / "synthetic.f16.gguf"
    out.unlink(missing_ok=True)
    out.with_name(out.stem + ".export.json").unlink(missing_ok=True)
    # warm cache: the input is read once before the timed run (same state as the prune benchmark)
    for path in sorted(source.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as handle:
            while handle.read(16 * 1024**2):
                pass
    run = _measured(_packager() + ["export", "gguf", str(model_dir), "--out", str(out), "--dtype", "f16", "--no-hash"])
    result = {"input_dir": str(source), "input_bytes": input_bytes, "layers": layers, "shapes": SHAPES, "input_dtype": "bf16",
              "export": {**run, "dtype": "F16", "bytes": out.stat().st_size,
                         "input_bytes_per_second": input_bytes / run["seconds"]}}
    if not keep_files:
        out.unlink(missing_ok=True)
        out.with_name(out.stem + ".export.json").unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "gguf", help="scratch directory (outside git)")
    parser.add_argument("--layers", type=int, default=3, help="layers of the synthetic checkpoint (each ~1.25 GB)")
    parser.add_argument("--quant", default=",".join(QUANTS), help="quant types for the default model")
    parser.add_argument("--sentences", type=int, default=20, help="test sentences for the logit divergence")
    parser.add_argument("--default-model", type=Path, default=DEFAULT_MODEL, help="the default model checkpoint")
    parser.add_argument("--skip-synthetic", action="store_true", help="keep the synthetic result of the previous run")
    parser.add_argument("--keep-files", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from converters.gguf.quantize import parse_quant_types
    from packager import __version__
    from runtime.atomic import atomic_write_json

    args.work.mkdir(parents=True, exist_ok=True)
    baseline = _measured([sys.executable, "-c", "import packager.cli, converters.gguf.export, converters.gguf.quantize, llama_cpp"])
    print("default model ...", flush=True)
    default = bench_default(args.work, tuple(parse_quant_types(args.quant)), args.sentences, args.default_model)
    synthetic = {"skipped": "--skip-synthetic"}
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.skip_synthetic and "export" in previous.get("synthetic", {}):
        synthetic = {**previous["synthetic"], "from_run_created_unix": previous["created_unix"],
                     "machine_then": previous.get("machine")}
    if not args.skip_synthetic:
        print("synthetic multi-GB checkpoint ...", flush=True)
        synthetic = bench_synthetic(args.work, args.layers, args.keep_files)
    result = {
        "benchmark": "gguf", "created_unix": int(time.time()),
        "command": [sys.executable, "-m", "bench.gguf_bench", *(argv if argv is not None else sys.argv[1:])],
        "method": {"rss": "child process sampled every 10 ms from /proc/<pid>/status: peak RssAnon and VmHWM",
                   "export": "`packager export gguf` CLI in a child process, including interpreter start and imports",
                   "quantize": "llama.cpp llama_model_quantize in this process from the F32 export",
                   "divergence": "llama.cpp logits of each file vs the F32 file on rendered test-split prompts"},
        "interpreter_baseline": {k: baseline[k] for k in ("peak_rss_anon_bytes", "peak_rss_total_bytes")},
        "default_pruned": default,
        "synthetic": synthetic,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"packager": __version__},
    }
    if "export" in synthetic and "from_run_created_unix" not in synthetic:
        synthetic["export"]["peak_rss_anon_above_baseline_bytes"] = (
            synthetic["export"]["peak_rss_anon_bytes"] - baseline["peak_rss_anon_bytes"])
        synthetic["export"]["peak_rss_anon_fraction_of_input"] = synthetic["export"]["peak_rss_anon_bytes"] / synthetic["input_bytes"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    if not args.keep_files:
        for path in args.work.glob("default-pruned*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(json.dumps({"default_pruned": {k: v.get("bytes") for k, v in default.get("exports", {}).items()},
                      "synthetic_export": {k: synthetic.get("export", {}).get(k) for k in
                                           ("seconds", "peak_rss_anon_bytes", "peak_rss_total_bytes", "bytes")}}, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
