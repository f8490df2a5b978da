"""Translation throughput benchmark (part of `make bench`, about a minute): segments per second
through the runtime's `Translator` (segmentation, placeholder protection, generation budget) with
`--batch-size` sequences decoded together against one at a time, on the same segments.

The embedded default model (models/default) is exported to an F16 GGUF (llama.cpp) and an fp32
ONNX graph (ONNX Runtime); the segments are the English sources of the fixed evaluation split
(data/harvest/eval/test.jsonl, en->de, spread evenly). Greedy decoding. Each setting runs
`--rounds` times, alternating, and the median is kept (the machine may be shared). Batched and
one-at-a-time texts are compared segment by segment: batched matrix products round differently
in the last bits, so a near-tie can flip a token (the count is recorded, not assumed).
Writes bench/results/translate.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "translate.json"
DEFAULT_MODEL = REPO / "models" / "default"
TEST_SPLIT = REPO / "data" / "harvest" / "eval" / "test.jsonl"


def _segments(n: int) -> list[str]:
    rows = [json.loads(line) for line in TEST_SPLIT.open(encoding="utf-8")]
    sources = [r["src"] for r in rows if r["src_lang"] == "en" and r["tgt_lang"] == "de"]
    step = max(1, len(sources) // n)
    return sources[::step][:n]


def _run(model: Path, texts: list[str], batch_size: int, threads: int) -> tuple[dict, list[str]]:
    from runtime.translator import Translator

    with Translator(model, threads, src="en", tgt="de", batch_size=batch_size, max_new_tokens=128) as translator:
        translator.translate(texts[:batch_size])  # warm-up
        translator.backend.timings.reset()
        translator.core.stats.new_tokens = 0
        started = time.perf_counter()
        outputs = translator.translate(texts)
        wall = time.perf_counter() - started
        timings = translator.backend.timings.as_dict()
        new_tokens = translator.stats.new_tokens
    return {"seconds": round(wall, 3), "segments_per_second": round(len(texts) / wall, 2),
            "generated_tokens_per_second": round(new_tokens / wall, 1),
            "prefill_tokens": timings["prefill_tokens"], "new_tokens": new_tokens}, outputs


def _models(tmp: Path, formats: list[str]) -> dict[str, Path]:
    models = {}
    if "gguf" in formats:
        from converters.gguf.export import export_gguf

        models["gguf F16"] = export_gguf(DEFAULT_MODEL, tmp / "default.f16.gguf", dtype="f16")
    if "onnx" in formats:
        from converters.onnx.export import export_onnx

        models["onnx fp32"] = export_onnx(DEFAULT_MODEL, tmp / "onnx", hash_inputs=False, check=False)
    return models


def _measure(model: Path, texts: list[str], batch_size: int, threads: int, rounds: int) -> dict:
    runs: dict[int, list[dict]] = {1: [], batch_size: []}
    outputs: dict[int, list[str]] = {}
    for _ in range(rounds):
        for size in (1, batch_size):
            record, outputs[size] = _run(model, texts, size, threads)
            runs[size].append(record)
    one = statistics.median(r["segments_per_second"] for r in runs[1])
    many = statistics.median(r["segments_per_second"] for r in runs[batch_size])
    differ = [i for i, (a, b) in enumerate(zip(outputs[1], outputs[batch_size])) if a != b]
    return {"one_at_a_time": {"median_segments_per_second": one, "runs": runs[1]},
            "batched": {"batch_size": batch_size, "median_segments_per_second": many, "runs": runs[batch_size]},
            "speedup": round(many / one, 3),
            "identical_outputs": f"{len(texts) - len(differ)}/{len(texts)}",
            "differing": [{"src": texts[i], "one_at_a_time": outputs[1][i], "batched": outputs[batch_size][i]} for i in differ]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", default="gguf,onnx")
    args = parser.parse_args()
    if not TEST_SPLIT.is_file() or not (DEFAULT_MODEL / "config.json").is_file():
        print(f"translate_bench: {TEST_SPLIT} or {DEFAULT_MODEL} is missing (make data-eval / train-default); skipped",
              file=sys.stderr)
        return 0
    texts = _segments(args.segments)
    results = {}
    with tempfile.TemporaryDirectory(prefix="translate-bench-") as tmp:
        for name, model in _models(Path(tmp), args.formats.split(",")).items():
            print(f"translate_bench: {name}", file=sys.stderr, flush=True)
            results[name] = _measure(model, texts, args.batch_size, args.threads, args.rounds)
    record = {
        "benchmark": "translate", "model": "models/default", "segments": len(texts), "direction": "en->de",
        "split": str(TEST_SPLIT.relative_to(REPO)), "threads": args.threads, "rounds": args.rounds,
        "results": results,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = {name: {k: r[k] for k in ("speedup", "identical_outputs")} | {
        "one": r["one_at_a_time"]["median_segments_per_second"], "batched": r["batched"]["median_segments_per_second"]}
        for name, r in results.items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
