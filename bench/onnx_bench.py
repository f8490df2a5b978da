"""ONNX benchmark (part of `make bench`): ONNX Runtime next to llama.cpp on the same pruned
default model, in one run; results to bench/results/onnx.json.

1. The embedded default model (models/default; a random model of the same shape when it is
   not there yet, flagged in the results) is pruned with uniform plans at two drop ratios
   (random expert choice: size and speed do not depend on which experts are kept; uniform so
   that stock llama.cpp loads the same model).
2. Each pruned model is exported with the real CLI in a child process (export time, peak
   RSS): ONNX fp32 / int8 / int4 and GGUF F32 / Q8_0 / Q4_0 (the comparable llama.cpp types:
   8-bit, and 4-bit symmetric blocks of 32).
3. Each file is run by the device runtime in a fresh process that imports only `runtime/`
   (`python -m bench.onnx_bench --worker`): file size, load time, peak RSS (total VmHWM and
   sampled anonymous RssAnon, absolute and above the interpreter-plus-runtime baseline),
   prefill tok/s on a 64-token prompt and decode tok/s over fixed-length greedy generations
   of harvested test sentences (stop tokens off, so every file decodes the same count).
4. The MoE formulations (com.microsoft MoE op vs standard-op sparse vs dense) on the 50%
   model, same measurements: the basis of the exporter's default.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.gguf_bench import _measured, _packager, _test_sentences
from runtime.memory import proc_status

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "onnx.json"
DEFAULT_MODEL = REPO / "models" / "default"
DROP_RATIOS = (0.5, 0.75)
ONNX_QUANTS = ("fp32", "int8", "int4")
GGUF_QUANTS = ("Q8_0", "Q4_0")  # next to int8 / int4
PREFILL_TOKENS = 64
DECODE_TOKENS = 32
SAMPLE_SECONDS = 0.005
REPEATS = 5
FALLBACK_SENTENCES = ["Open the file", "Save the document before closing the window.", "The printer is not responding.",
                      "Do you want to replace the existing file?", "Show hidden files and folders"]


# ----------------------------------------------------------------------------- the worker
def _worker(job_file: str) -> int:
    """Runtime only: load one model, measure, print one JSON line."""
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    from runtime.backends import backend_class, resolve_model

    model_file, config = resolve_model(job["model"])
    cls = backend_class(config.format)  # the backend library's import is part of the baseline
    baseline = proc_status()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # VmHWM := current RSS, so the peak covers the model only
    except OSError:
        pass
    peak_anon = [baseline.get("RssAnon", 0)]
    done = threading.Event()

    def sample():
        while not done.wait(SAMPLE_SECONDS):
            peak_anon[0] = max(peak_anon[0], proc_status().get("RssAnon", 0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    backend = cls.load(model_file, config, n_threads=job["threads"])
    load_seconds = time.perf_counter() - started
    after_load = proc_status()
    prompts = [backend.prompt_ids(text, src, tgt) for src, tgt, text in job["sentences"]]
    long_prompt = (sum(prompts, []) * PREFILL_TOKENS)[:PREFILL_TOKENS]
    list(backend.generate_ids(prompts[0], 2, stop_ids=set()))  # warm-up allocations
    # best of several runs: on a shared machine the slowest runs measure the neighbours
    prefill = []
    for _ in range(REPEATS):
        backend.timings.reset()
        list(backend.generate_ids(long_prompt, 1, stop_ids=set()))
        prefill.append(backend.timings.prefill_seconds)
    runs = []
    for _ in range(REPEATS):
        backend.timings.reset()
        for ids in prompts:
            list(backend.generate_ids(ids, job["decode_tokens"], stop_ids=set()))
        runs.append(backend.timings.as_dict())
    timings = max(runs, key=lambda item: item["decode_tokens_per_second"])
    done.set()
    sampler.join()
    final = proc_status()
    backend.close()
    print(json.dumps({
        "load_seconds": load_seconds,
        "prefill_tokens": PREFILL_TOKENS,
        "prefill_tokens_per_second": PREFILL_TOKENS / min(prefill),
        "decode_tokens": timings["decode_tokens"],
        "decode_tokens_per_second": timings["decode_tokens_per_second"],
        "short_prompt_prefill_tokens_per_second": timings["prefill_tokens_per_second"],
        "decode_tokens_per_second_all_runs": [run["decode_tokens_per_second"] for run in runs],
        "prefill_tokens_per_second_all_runs": [PREFILL_TOKENS / seconds for seconds in prefill],
        "threads": backend.n_threads,
        "memory": {
            "baseline_rss_bytes": baseline.get("VmRSS", 0),
            "baseline_rss_anon_bytes": baseline.get("RssAnon", 0),
            "after_load_rss_bytes": after_load.get("VmRSS", 0),
            "peak_rss_bytes": final.get("VmHWM", 0),
            "peak_rss_anon_bytes": peak_anon[0],
            "peak_rss_above_baseline_bytes": max(0, final.get("VmHWM", 0) - baseline.get("VmRSS", 0)),
            "peak_rss_anon_above_baseline_bytes": max(0, peak_anon[0] - baseline.get("RssAnon", 0)),
        },
    }))
    return 0


# ----------------------------------------------------------------------------- the driver
def _sentences(limit: int) -> list[tuple[str, str, str]]:
    rows = _test_sentences(limit, lambda record: record["src_lang"] == "en" and 10 <= len(record["src"]) <= 80)
    return rows or [("en", "de", text) for text in FALLBACK_SENTENCES[:limit]]


def _run_worker(model: Path, sentences, threads: int, work: Path) -> dict:
    job = work / "job.json"
    job.write_text(json.dumps({"model": str(model), "sentences": sentences, "threads": threads,
                               "decode_tokens": DECODE_TOKENS}))
    result = subprocess.run([sys.executable, "-m", "bench.onnx_bench", "--worker", str(job)], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"worker for {model} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _default_model(work: Path) -> tuple[Path, str]:
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL, "models/default (trained)"
    model_dir = work / "random-default-shape"
    if not (model_dir / "config.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import build_tiny

        # the default's shape (models/train_default.py); random weights: speed and size only
        build_tiny("qwen3_moe", model_dir, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, intermediate_size=512, moe_intermediate_size=256, num_experts=16,
                   num_experts_per_tok=2, vocab_size=12000, tie_word_embeddings=True, max_position_embeddings=512)
        _write_bpe(model_dir)
    return model_dir, "random weights in the default's shape (models/default not trained yet): speed/size only"


def _write_bpe(model_dir: Path) -> None:
    """Byte-level BPE on harvested sentences (llama.cpp's GGUF loader needs BPE, not the tiny
    models' word-level vocabulary), keeping the tiny models' special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tiny_models import SPECIAL_TOKENS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text for _, _, text in _sentences(5000)] or FALLBACK_SENTENCES * 10, trainer)
    tokenizer.save(str(model_dir / "tokenizer.json"))


def _prune(model_dir: Path, drop_ratio: float, out_dir: Path) -> dict:
    from packager.core.arch import load_arch
    from packager.core.fingerprint import model_fingerprint
    from packager.core.plan_file import Plan
    from packager.prune import prune_checkpoint

    config = json.loads((model_dir / "config.json").read_text())
    arch = load_arch(config)
    n_experts = arch.n_experts(config)
    n_keep = max(arch.top_k(config), round(n_experts * (1 - drop_ratio)))
    rng = random.Random(0)
    keep = {layer_idx: sorted(rng.sample(range(n_experts), n_keep)) for layer_idx in arch.moe_layers(config)}
    plan = Plan(model_fingerprint(model_dir), keep, {"ranker": "random", "allocation": "uniform", "drop_ratio": drop_ratio,
                                                      "note": "onnx benchmark"})
    shutil.rmtree(out_dir, ignore_errors=True)
    prune_checkpoint(model_dir, plan, out_dir)
    return {"kept_experts_per_layer": n_keep, "of": n_experts}


def _bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def bench_model(pruned: Path, tag: str, work: Path, sentences, threads: int, formulations: tuple[str, ...]) -> dict:
    from converters.gguf.export import quantized_path
    from runtime.schema import ExportConfig

    out: dict = {"onnx": {}, "gguf": {}, "formulations": {}}
    for formulation in formulations:
        # the standard-op formulations quantize through onnxruntime's own quantizers
        for quant in (ONNX_QUANTS if formulation != "dense" else ("fp32",)):
            target = work / f"{tag}.{formulation}.{quant}.onnx.d"
            export = _measured(_packager() + ["export", "onnx", str(pruned), "--out", str(target), "--quant", quant,
                                              "--moe", formulation, "--force", "--no-hash"])
            config = ExportConfig.load(target / "model.export.json")
            entry = {
                "bytes": _bytes(config.model_paths(target)),
                "export": export,
                "logit_divergence_vs_transformers": (config.extra.get("export_check") or {}).get(quant),
                "contrib_ops": config.extra["contrib_ops"],
                "run": _run_worker(target, sentences, threads, work),
            }
            print(f"onnx {tag} {formulation} {quant}: {entry['bytes']:,} bytes, prefill "
                  f"{entry['run']['prefill_tokens_per_second']:.0f} tok/s, decode {entry['run']['decode_tokens_per_second']:.0f} tok/s",
                  file=sys.stderr, flush=True)
            if formulation == "contrib":
                out["onnx"][quant] = entry
            out["formulations"][f"{formulation}/{quant}"] = {
                "bytes": entry["bytes"], "load_seconds": entry["run"]["load_seconds"],
                "prefill_tokens_per_second": entry["run"]["prefill_tokens_per_second"],
                "decode_tokens_per_second": entry["run"]["decode_tokens_per_second"],
                "peak_rss_anon_above_baseline_bytes": entry["run"]["memory"]["peak_rss_anon_above_baseline_bytes"],
                "max_abs_logit_diff": (entry["logit_divergence_vs_transformers"] or {}).get("max_abs"),
                "contrib_ops": entry["contrib_ops"],
            }
    gguf = work / f"{tag}.gguf"
    export = _measured(_packager() + ["export", "gguf", str(pruned), "--out", str(gguf), "--dtype", "f32",
                                      "--quant", ",".join(GGUF_QUANTS), "--force", "--no-hash"])
    for quant, path in [("F32", gguf)] + [(q, quantized_path(gguf, q)) for q in GGUF_QUANTS]:
        entry = {"bytes": path.stat().st_size, "export_including_all_quant_types": export,
                 "run": _run_worker(path, sentences, threads, work)}
        print(f"gguf {tag} {quant}: {entry['bytes']:,} bytes, prefill {entry['run']['prefill_tokens_per_second']:.0f} tok/s, "
              f"decode {entry['run']['decode_tokens_per_second']:.0f} tok/s", file=sys.stderr, flush=True)
        out["gguf"][quant] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "onnx", help="scratch directory (outside git)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads for both backends")
    parser.add_argument("--sentences", type=int, default=8, help="harvested test sentences to decode")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-files", action="store_true")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from packager import __version__
    from runtime.atomic import atomic_write_json

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, model_note = _default_model(args.work)
    sentences = _sentences(args.sentences)
    started = time.perf_counter()
    results = {
        "benchmark": "onnx",
        "model": str(model_dir),
        "model_note": model_note,
        "threads": args.threads,
        "prefill_prompt_tokens": PREFILL_TOKENS,
        "decode_tokens_per_sentence": DECODE_TOKENS,
        "sentences": len(sentences),
        "comparable_quantization": {"int8": "Q8_0", "int4": "Q4_0", "fp32": "F32"},
        "drop_ratios": {},
    }
    for index, drop_ratio in enumerate(DROP_RATIOS):
        tag = f"drop{int(drop_ratio * 100)}"
        pruned = args.work / f"{tag}-pruned"
        plan = _prune(model_dir, drop_ratio, pruned)
        formulations = ("contrib", "sparse", "dense") if index == 0 else ("contrib",)
        results["drop_ratios"][str(drop_ratio)] = {
            "plan": plan,
            "checkpoint_bytes": _bytes(pruned.glob("*.safetensors")),
            **bench_model(pruned, tag, args.work, sentences, args.threads, formulations),
        }
    import onnxruntime

    results["seconds"] = time.perf_counter() - started
    results["versions"] = {"packager": __version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    try:
        import llama_cpp

        results["versions"]["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    results["command"] = sys.argv
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    print(f"onnx bench: wrote {args.out} in {results['seconds']:.0f}s", file=sys.stderr)
    if not args.keep_files:
        for path in args.work.glob("drop*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
