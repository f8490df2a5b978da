"""The quality goals of issue 18 on the embedded default: 50% of the routed experts dropped within 1
chrF++ of the parent with no training (`--drop 0.5 --minutes 0`), and 75% dropped within 2 after
distillation, using the best of search, merging and recovery (`--drop 0.75`).

    python bench/quality_goal_bench.py --out DIR [--pair en-de] [--drop 0.75] [--minutes 8] [--sentences 4000]
                                       [--test-n 400] [--skip-merge | --merge-align none|activations|weights [--skip-drop]]
                                       [--uniform]

1. Statistics: teacher-forced calibration on the train split (100 sentences per direction).
2. Plan: `packager plan search --drop D` on the first 100 dev records of the pair (grid at
   D plus the KL-proxy refinement), never on the test split.
3. Models: the plan dropped (`prune`) and merged (`prune --reduce merge`, partners from 256
   train records), each distilled on the parent's translations of `--sentences` train
   sentences for `--minutes` (one thread, `packager.distill`, best dev-loss weights kept);
   `--minutes 0` trains nothing and skips the merge (the no-training goal).
4. Scores on the test split: the first `--test-n` records of the pair in a seeded shuffle,
   greedy (the experiment cells' decoding): chrF++ with a 95% bootstrap interval, the error rate,
   and against the parent a paired bootstrap of the chrF++ difference (same resampled
   sentences for both models, 1000 resamples): its mean, 95% interval and the share of
   resamples in which the gap is at most 2 points.
The sha256 of the parent's weights is recorded with every figure. Writes DIR/goal.json (`--record`)."""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def test_sample(path: Path, pair: str, n: int, seed: int = 0) -> list[dict]:
    src, tgt = pair.split("-")
    pool = [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())
            if r["src_lang"] == src and r["tgt_lang"] == tgt]
    random.Random(f"goal75:{seed}:{pair}").shuffle(pool)  # the first runs' seed string: samples stay comparable
    return pool[:n]


def translate(model, loaded, builder, pair: str, records: list[dict]) -> list[str]:
    from packager.experiment_cells import translate as greedy

    prompts = [builder.encode(pair, r["src"])[0] for r in records]
    outputs = greedy(model, prompts, loaded.eos_id, loaded.pad_id, None, 256, 32)
    return [loaded.tokenizer.decode(o["ids"], skip_special_tokens=True).strip() for o in outputs]


def paired_bootstrap(parent: list[str], other: list[str], refs: list[str], n: int = 1000, within: float = 2.0) -> dict:
    """Corpus chrF++ gap (parent - other) over `n` resamples of the sentences, both models on the same
    resample (sentence statistics summed, as sacrebleu's own bootstrap does)."""
    import numpy as np
    import sacrebleu

    chrf = sacrebleu.CHRF(word_order=2)
    a = np.array(chrf._extract_corpus_statistics(parent, [refs]), dtype=np.float64)
    b = np.array(chrf._extract_corpus_statistics(other, [refs]), dtype=np.float64)
    rng = np.random.default_rng(12345)
    gaps = []
    for _ in range(n):
        idx = rng.integers(0, len(refs), len(refs))
        gaps.append(chrf._compute_score_from_stats(list(a[idx].sum(0))).score
                    - chrf._compute_score_from_stats(list(b[idx].sum(0))).score)
    gaps = sorted(gaps)
    return {"gap": round(chrf._compute_score_from_stats(list(a.sum(0))).score
                         - chrf._compute_score_from_stats(list(b.sum(0))).score, 2),
            "gap_ci95": [round(gaps[int(0.025 * n)], 2), round(gaps[int(0.975 * n) - 1], 2)],
            f"share_within_{within:g}": round(sum(g <= within for g in gaps) / n, 3), "resamples": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "harvest")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pair", default="en-de")
    parser.add_argument("--drop", type=float, default=0.75)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--sentences", type=int, default=4000)
    parser.add_argument("--test-n", type=int, default=400)
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--merge-align", default="none", help="neuron alignment before merging: none, activations, weights")
    parser.add_argument("--skip-drop", action="store_true", help="distil only the merged model (the dropped one was run before)")
    parser.add_argument("--record", default="goal.json", help="file name of the record in DIR")
    parser.add_argument("--uniform", action="store_true", help="uniform plans only (what stock llama.cpp loads)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from packager import load_pruned
    from packager.calibrate import CalibrationSettings, calibrate, load_model
    from packager.calibration_data import PromptBuilder
    from packager.core.stats import RoutingStats
    from packager.distill import DistillSettings, distill
    from packager.merge import merge_prune
    from packager.plan_search import Budgets, SearchSettings, search, write_outputs
    from packager.prune import prune_checkpoint
    from packager.quality import ErrorDetector, score_direction, usual_length_ratio
    from runtime.file_hash import file_sha256

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    lang = args.pair.split("-")[1]
    tag = f"{round(100 * args.drop):d}"
    train = args.minutes > 0
    record = {"model": {"dir": str(args.model), "model.safetensors sha256": file_sha256(args.model / "model.safetensors")},
              "pair": args.pair, "settings": vars(args) | {"out": str(out), "model": str(args.model), "data": str(args.data)},
              "timings": {}}
    stats_path = out / "stats-train.safetensors"
    if not stats_path.is_file():
        stats = calibrate(args.model, [args.data / "train.jsonl"],
                          CalibrationSettings(pairs=(args.pair,), teacher_forced=True, max_sentences=100, batch_size=32,
                                              reap=True), show_progress=False)
        stats.save(stats_path)
    stats = RoutingStats.load(stats_path)
    # 2. the plan
    plan_path = out / f"plan-{tag}.json"
    result = search(stats, args.model, args.data / "dev.jsonl", Budgets(min_drop=args.drop),
                    SearchSettings(langs=(lang,), drops=(args.drop,), dev_n=100, threads=1, uniform=args.uniform), out / "search")
    write_outputs(result, plan_path, out / f"plan-{tag}.frontier.json", None)
    record["search"] = {"chosen": {k: result.chosen[k] for k in ("name", "counts", "chrf++", "error_rate", "kl")},
                        "parent_dev_chrf++": result.parent["chrf++"], "refinement": result.refinement}
    record["timings"]["search"] = round(time.monotonic() - started, 1)
    # 3. models
    models = {"dropped": out / f"dropped-{tag}"} if train and not args.skip_drop else {}
    if models and not (models["dropped"] / "pruning.json").is_file():
        prune_checkpoint(args.model, plan_path, models["dropped"], force=True)
    if train and not args.skip_merge:
        calib = out / "merge-calib.jsonl"
        if not calib.is_file():
            from packager.pair_data import iter_pair_records

            rows = [r for _, r in iter_pair_records(args.data / "train.jsonl", SystemExit, "train")
                    if f"{r['src_lang']}-{r['tgt_lang']}" == args.pair][:256]
            calib.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        merged = "merged" if args.merge_align == "none" else f"merged-aligned-{args.merge_align}"
        models[merged] = out / f"{merged}-{tag}"
        if not (models[merged] / "pruning.json").is_file():
            merge_prune(args.model, plan_path, models[merged], stats=stats, calib=[calib], align=args.merge_align, force=True)
    for name in list(models):
        target = out / f"{name}-{tag}-distilled"
        if not (target / "distillation.json").is_file():
            t0 = time.monotonic()
            distill(models[name], args.model, [args.data / "train.jsonl"],
                    DistillSettings(pairs=(args.pair,), sentences=args.sentences, minutes=args.minutes, eval_every=50,
                                    gen_batch_size=64), target, cache_dir=out / "distill-cache",
                    work_dir=out / "work" / name, force=True, command=" ".join(sys.argv))
            record["timings"][f"distill {name}"] = round(time.monotonic() - t0, 1)
        run = json.loads((target / "distillation.json").read_text(encoding="utf-8"))["run"]
        record.setdefault("training", {})[name] = {k: run.get(k) for k in ("step", "elapsed", "best_step", "dev_loss_initial",
                                                                          "best_dev_loss", "stopped")}
        models[f"{name} + distillation"] = target
    # 4. test scores
    loaded = load_model(args.model)
    builder = PromptBuilder(args.model, loaded.tokenizer, "{source}")
    records = test_sample(args.data / "test.jsonl", args.pair, args.test_n)
    srcs, refs = [r["src"] for r in records], [r["tgt"] for r in records]
    detector = ErrorDetector(["en", lang], {("en", lang): usual_length_ratio(srcs, refs)})
    hyps = {"parent": translate(loaded.model, loaded, builder, args.pair, records)}
    from packager.masking import expert_mask

    plan_keep = {int(k): v for k, v in json.loads(plan_path.read_text())["keep"].items()}
    with expert_mask(loaded.model, plan_keep):
        hyps["searched plan, no training (mask mode)"] = translate(loaded.model, loaded, builder, args.pair, records)
    for name, path in models.items():
        model = load_pruned(path, dtype=torch.float32).eval()
        hyps[name] = translate(model, loaded, builder, args.pair, records)
    scores = {}
    for name, h in hyps.items():
        metrics, _ = score_direction(srcs, refs, h, "en", lang, detector, n_bootstrap=1000)
        scores[name] = {"chrf++": metrics["chrf++"], "chrf++_ci95": metrics.get("chrf++_ci95"), "error_rate": metrics["error_rate"]}
        if name != "parent":
            # the goal's allowed gap: 1 point with no training, 2 after distillation
            scores[name]["vs_parent"] = paired_bootstrap(hyps["parent"], h, refs, within=2.0 if train else 1.0)
        print(name, scores[name], flush=True)
    record["test"] = {"split": "test", "n": len(records), "selection": "seeded shuffle ('goal75:0:PAIR') of the pair's test records",
                      "scores": scores}
    record["timings"]["total"] = round(time.monotonic() - started, 1)
    (out / args.record).write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
