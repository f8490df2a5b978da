"""Merge vs drop, and top-k reduction, on the embedded default (issue 18 parts 2-3).

    python bench/reduce_bench.py --stats STATS --out DIR [--n 100] [--drops 0.5,0.75,0.875]

For each drop ratio (routing-mass ranking, uniform allocation so GGUF loads it) the parent is
pruned twice, dropping (`packager prune`) and merging (`--reduce merge`, partners chosen on the
train split's en->de records); both are scored with greedy decoding on the first N en->de
records of the dev split (chrF++, generation-error rate: packager.plan_search scoring).
Top-k: the parent and the 50% drop are served at k=1 (packager.topk) and scored the same way;
decode tok/s is measured in llama.cpp (F16 GGUF, one thread, greedy, the same 30 dev prompts)
for k=2 and k=1. Writes DIR/reduce_bench.json and prints Markdown tables.
Each model gets its own cache directory: a merged and a dropped checkpoint of one plan share
the router-only fingerprint that plan_search keys its cells on."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def quality(model_dir: Path, dev: Path, work: Path, n: int) -> dict:
    from packager.plan_search import Evaluator, SearchSettings

    evaluator = Evaluator(model_dir, dev, SearchSettings(langs=("de",), dev_n=n, threads=1), work)
    q = evaluator.quality(None)
    return {"chrf++": q["chrf++"], "bleu": q["bleu"], "error_rate": q["error_rate"]}


def decode_speed(model_dir: Path, dev: Path, work: Path, prompts: int = 30) -> dict:
    from converters.gguf.export import export_gguf
    from runtime.backends import open_backend

    out = work / "model.f16.gguf"
    if not out.is_file():
        work.mkdir(parents=True, exist_ok=True)
        export_gguf(model_dir, out, None, dtype="f16", force=True, hash_inputs=False)
    sources = []
    for line in dev.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["src_lang"] == "en" and record["tgt_lang"] == "de":
            sources.append(record["src"])
        if len(sources) >= prompts:
            break
    with open_backend(out, n_threads=1) as backend:
        backend.translate(sources[0], "en", "de", max_new_tokens=64)   # warm-up
        backend.timings.reset()
        for text in sources:
            backend.translate(text, "en", "de", max_new_tokens=128)
        t = backend.timings
        return {"decode_tok_s": round(t.decode_tokens_per_second, 1), "decode_tokens": t.decode_tokens,
                "prefill_tok_s": round(t.prefill_tokens_per_second, 1), "file_bytes": out.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--dev", type=Path, default=REPO / "data" / "harvest" / "dev.jsonl")
    parser.add_argument("--calib", type=Path, default=REPO / "data" / "harvest" / "train.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--drops", default="0.5,0.75,0.875")
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from packager.merge import merge_prune
    from packager.planning import PlanSettings, make_plan
    from packager.prune import prune_checkpoint
    from packager.core.stats import RoutingStats
    from packager.topk import reduce_top_k

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calib-en-de.jsonl"
    if not calib.is_file():
        rows = []
        with args.calib.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if record["src_lang"] == "en" and record["tgt_lang"] == "de":
                    rows.append(line)
                if len(rows) >= 256:
                    break
        calib.write_text("".join(rows), encoding="utf-8")
    stats = RoutingStats.load(args.stats)
    started = time.monotonic()
    results = {"setup": {"model": str(args.model), "dev": str(args.dev), "n": args.n, "pair": "en-de",
                         "plan": "routing-mass / uniform", "merge_calibration": "first 256 en->de records of the train split",
                         "threads": 1}, "parent": quality(args.model, args.dev, out / "cache-parent", args.n), "drops": []}
    for drop in (float(d) for d in args.drops.split(",")):
        plan = make_plan(stats, PlanSettings(langs=("de",), drop_ratio=drop, allocation="uniform"))
        slug = f"{drop:g}"
        dropped = out / f"drop-{slug}"
        merged = out / f"merge-{slug}"
        if not dropped.is_dir():
            prune_checkpoint(args.model, plan, dropped)
        if not merged.is_dir():
            merge_prune(args.model, plan, merged, stats=stats, calib=[calib])
        row = {"drop": quality(dropped, args.dev, out / f"cache-drop-{slug}", args.n),
               "merge": quality(merged, args.dev, out / f"cache-merge-{slug}", args.n), "drop_ratio": drop}
        results["drops"].append(row)
        print(f"drop {slug}: drop {row['drop']} merge {row['merge']}", flush=True)
    # top-k
    topk = []
    half = out / "drop-0.5"
    for name, source in (("parent", args.model), ("drop 50%", half)):
        if not source.is_dir():
            continue
        reduced = out / f"k1-{name.replace(' ', '').replace('%', '')}"
        if not reduced.is_dir():
            reduce_top_k(source, reduced, 1)
        for k, model_dir in ((2, source), (1, reduced)):
            entry = {"model": name, "top_k": k,
                     **quality(model_dir, args.dev, out / f"cache-{model_dir.name}-k{k}", args.n)}
            if not args.no_speed:
                entry.update(decode_speed(model_dir, args.dev, out / f"speed-{model_dir.name}-k{k}"))
            topk.append(entry)
            print(entry, flush=True)
    results["top_k"] = topk
    results["seconds"] = round(time.monotonic() - started, 1)
    (out / "reduce_bench.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    parent = results["parent"]
    print(f"\nparent dev chrF++ {parent['chrf++']} / errors {parent['error_rate']:.0%}\n")
    print("| dropped | drop: chrF++ / errors | merge: chrF++ / errors |\n|---|---|---|")
    for row in results["drops"]:
        print(f"| {row['drop_ratio']:.1%} | {row['drop']['chrf++']} / {row['drop']['error_rate']:.0%} | "
              f"{row['merge']['chrf++']} / {row['merge']['error_rate']:.0%} |")
    print("\n| model | top-k | chrF++ / errors | decode tok/s (llama.cpp F16, 1 thread) |\n|---|---|---|---|")
    for e in topk:
        print(f"| {e['model']} | {e['top_k']} | {e['chrf++']} / {e['error_rate']:.0%} | {e.get('decode_tok_s', '-')} |")


if __name__ == "__main__":
    main()
