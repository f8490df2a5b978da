"""Translation throughput benchmark (part of `make bench`): segments per second through the
runtime's `Translator` (segmentation, placeholder protection, generation budget), decoding
`--batch-size` pieces per backend call against one at a time, on the same segments.

The embedded default model (models/default) is exported to an F16 GGUF (or `--model` names a
model or bundle); the segments are the English sources of the harvested test split
(data/harvest/test.jsonl, en->de, spread evenly). Greedy decoding, so both runs give the same
text (checked). Writes bench/results/translate.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "translate.json"
DEFAULT_MODEL = REPO / "models" / "default"
TEST_SPLIT = REPO / "data" / "harvest" / "test.jsonl"


def _segments(n: int) -> list[str]:
    rows = [json.loads(line) for line in TEST_SPLIT.open(encoding="utf-8")]
    sources = [r["src"] for r in rows if r["src_lang"] == "en" and r["tgt_lang"] == "de"]
    step = max(1, len(sources) // n)
    return sources[::step][:n]


def _run(model: Path, texts: list[str], batch_size: int, threads: int) -> tuple[dict, list[str]]:
    from runtime.translator import Translator

    with Translator(model, threads, src="en", tgt="de", batch_size=batch_size) as translator:
        translator.translate(texts[:2])  # warm-up
        translator.backend.timings.reset()
        started = time.perf_counter()
        outputs = translator.translate(texts)
        wall = time.perf_counter() - started
        stats = translator.stats.as_dict()
        timings = translator.backend.timings.as_dict()
        max_batch = translator.backend.max_batch
    return {"batch_size": batch_size, "backend_max_batch": max_batch, "seconds": round(wall, 3),
            "segments_per_second": round(len(texts) / wall, 2),
            "decode_tokens_per_second": round(timings["decode_tokens_per_second"], 1),
            "pieces": stats["pieces"], "new_tokens": stats["new_tokens"]}, outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file, export or bundle (default: models/default as F16 GGUF)")
    parser.add_argument("--segments", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    if not TEST_SPLIT.is_file():
        print(f"translate_bench: {TEST_SPLIT} is missing (make data-eval); skipped", file=sys.stderr)
        return 0
    texts = _segments(args.segments)
    with tempfile.TemporaryDirectory(prefix="translate-bench-") as tmp:
        model = args.model
        if model is None:
            from converters.gguf.export import export_gguf

            model = export_gguf(DEFAULT_MODEL, Path(tmp) / "default.f16.gguf", dtype="f16")
        one, one_out = _run(model, texts, 1, args.threads)
        batched, batched_out = _run(model, texts, args.batch_size, args.threads)
    record = {
        "benchmark": "translate", "model": str(args.model or "models/default (F16 GGUF)"), "segments": len(texts),
        "threads": args.threads, "one_at_a_time": one, "batched": batched,
        "speedup": round(batched["segments_per_second"] / one["segments_per_second"], 3),
        "same_output": one_out == batched_out,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
