"""Per-layer top-k in ONNX Runtime (issue 18 part 3): decode speed and chrF++ of the default model
served at several k per MoE layer, from the same greedy runs; results to bench/results/topk_onnx.json.

    python -m bench.topk_bench [--ks 2,2,2,2 2,2,1,1 1,1,1,1] [--prompts 40] [--repeats 5]

Each k setting is written with packager.topk (the parent itself where k is the model's top-k),
exported to ONNX fp32 and run by ONNX Runtime with one thread, greedy, at most 128 new tokens,
on the first `--prompts` records of one direction of a harvest split (dev by default, never
test). Passes are interleaved A B C A B C ... so that other load on the machine hits every
setting alike (packager.experiments.reduce.decode_speeds); the medians are reported, plus
generated tokens per CPU second of the process. chrF++ and the generation-error rate are scored
on the first pass's translations (greedy: every pass gives the same) with packager.quality.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _records(split: Path, src: str, tgt: str, limit: int) -> list[dict]:
    from packager.pair_data import iter_pair_records

    rows = [r for _, r in iter_pair_records(split, SystemExit, "split") if (r["src_lang"], r["tgt_lang"]) == (src, tgt)][:limit]
    if not rows:
        raise SystemExit(f"error: {split}: no {src}->{tgt} records")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--split", type=Path, default=REPO / "data" / "harvest" / "dev.jsonl")
    parser.add_argument("--direction", default="en-de")
    parser.add_argument("--ks", nargs="+", default=["2,2,2,2", "2,2,1,1", "1,1,1,1"], help="k per MoE layer, one setting each")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "topk_onnx.json")
    args = parser.parse_args(argv)

    from packager.core.arch import load_arch
    from packager.experiments.reduce import decode_speeds
    from packager.quality import ErrorDetector, score_direction, usual_length_ratio
    from packager.topk import parse_top_k, reduce_top_k
    from runtime.atomic import atomic_write_json

    src, tgt = args.direction.split("-")
    records = _records(args.split, src, tgt, args.prompts)
    srcs, refs = [r["src"] for r in records], [r["tgt"] for r in records]
    config = json.loads((args.model / "config.json").read_text(encoding="utf-8"))
    parent_ks = load_arch(config).layer_top_ks(config)
    with tempfile.TemporaryDirectory(prefix="topk-bench-") as tmp:
        settings, dirs = [], []
        for text in args.ks:
            top_k = parse_top_k(text)
            ks = top_k if isinstance(top_k, list) else [top_k] * len(parent_ks)
            settings.append(ks)
            dirs.append(args.model if ks == parent_ks else
                        reduce_top_k(args.model, Path(tmp) / f"k-{'-'.join(map(str, ks))}", top_k))
        speeds = decode_speeds(dirs, Path(tmp) / "speed", srcs, src, tgt, args.repeats, fmt="onnx", keep_outputs=True)
    detector = ErrorDetector([src, tgt], {(src, tgt): usual_length_ratio(srcs, refs)})
    rows = []
    for ks, speed in zip(settings, speeds):
        scores, _ = score_direction(srcs, refs, speed.pop("outputs"), src, tgt, detector)
        rows.append({"per_layer_k": ks, "chrf++": scores["chrf++"], "error_rate": scores["error_rate"], "speed": speed})
        print(f"k {'/'.join(map(str, ks))}: chrF++ {scores['chrf++']:.1f}, errors {100 * scores['error_rate']:.0f}%, "
              f"decode {speed['decode_tok_s']:.0f} tok/s (runs {speed['decode_tok_s_runs']}), "
              f"{speed['tokens_per_cpu_s']:.0f} tokens per CPU s", file=sys.stderr)
    atomic_write_json(args.out, {
        "model": str(args.model), "split": str(args.split), "direction": args.direction, "prompts": len(srcs),
        "repeats": args.repeats, "runtime": "ONNX Runtime fp32 (com.microsoft MoE op), 1 thread, greedy, max 128 new tokens",
        "command": " ".join(["python -m bench.topk_bench", *(argv if argv is not None else sys.argv[1:])]), "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
