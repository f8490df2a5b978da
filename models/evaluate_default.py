"""Score a translator checkpoint on held-out splits: greedy chrF++ and BLEU per direction.

Splits (under --data): `eval` the fixed evaluation split of `make demo` (eval/test.jsonl, the same
file whatever else was harvested), `test` the in-domain test split of the harvest, `unseen` whole
packages never trained on (unseen.jsonl). Every split's result records the file's content hash
(models.harvest.split_hash).

Used for the embedded default's model card (`make eval-default`) and by the training run.
Usage: python -m models.evaluate_default --model models/default --data data/harvest --splits eval,unseen --out EVAL.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DIRECTIONS = [("en", t) for t in ("de", "fr", "es", "ru", "ja", "zh")] + [(s, "en") for s in ("de", "fr", "es", "ru", "ja", "zh")]


SPLIT_FILES = {"eval": "eval/test.jsonl", "test": "test.jsonl", "unseen": "unseen.jsonl"}


def test_pairs(data_dir: Path, src: str, tgt: str, limit: int, split: str = "test") -> list[tuple[str, str]]:
    """`limit` pairs of a direction spread evenly over the split file's (sorted, deterministic) order."""
    other = tgt if src == "en" else src
    pairs = []
    with (data_dir / SPLIT_FILES[split]).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["tgt_lang"] != other:
                continue
            pairs.append((record["src"], record["tgt"]) if src == "en" else (record["tgt"], record["src"]))
    # Spread the sample over the whole (alphabetically sorted) split rather than its first letters.
    step = max(1, len(pairs) // limit) if limit else 1
    return pairs[::step][:limit] if limit else pairs


def translate_batch(model, tokenizer, texts: list[str], src: str, tgt: str, max_new_tokens: int = 96) -> list[str]:
    import torch

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             source_lang=src, target_lang=tgt) for t in texts]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def translate_all(model, tokenizer, texts: list[str], src: str, tgt: str, batch_size: int = 32) -> list[str]:
    # Sorting by length keeps padding (and wasted compute) small.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    result = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, hyp in zip(idx, translate_batch(model, tokenizer, [texts[i] for i in idx], src, tgt)):
            result[i] = hyp
    return result


def score(hyps: list[str], refs: list[str], tgt: str) -> dict:
    import sacrebleu

    chrf = sacrebleu.CHRF(word_order=2)
    # Japanese BLEU would need MeCab (not installed): character tokenisation, stated in the signature.
    bleu = sacrebleu.BLEU(tokenize={"zh": "zh", "ja": "char"}.get(tgt, "13a"))
    return {"chrf++": round(chrf.corpus_score(hyps, [refs]).score, 2), "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
            "chrf_signature": str(chrf.get_signature()), "bleu_signature": str(bleu.get_signature())}


def evaluate_split(model, tokenizer, data: Path, split: str, wanted, per_direction: int) -> dict:
    from models.harvest import split_hash

    path = data / SPLIT_FILES[split]
    results = {}
    for src, tgt in wanted:
        pairs = test_pairs(data, src, tgt, per_direction, split)
        started = time.time()
        hyps = translate_all(model, tokenizer, [p[0] for p in pairs], src, tgt)
        metrics = score(hyps, [p[1] for p in pairs], tgt)
        # No example sentences in the output: it is committed, and test sentences are third-party text.
        metrics.update(n=len(pairs), seconds=round(time.time() - started, 1))
        results[f"{src}-{tgt}"] = metrics
        print(f"{split} {src}->{tgt}: chrF++ {metrics['chrf++']:.1f} BLEU {metrics['bleu']:.1f} (n={len(pairs)}, "
              f"{metrics['seconds']}s)", file=sys.stderr)
    return {"file": str(path), "sha256": split_hash(path), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--data", type=Path, default=Path("data/harvest"))
    parser.add_argument("--splits", default="eval,unseen",
                        help="comma list of " + ", ".join(SPLIT_FILES) + "; the first one also fills the top-level results")
    parser.add_argument("--per-direction", type=int, default=300)
    parser.add_argument("--directions", default="all", help="comma list like en-de,de-en or 'all'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--floor", type=float, default=None,
                        help="fail (exit 1) when a --floor-directions direction scores chrF++ below this (first split)")
    parser.add_argument("--floor-directions", default="en-de,en-fr,en-es")
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    unknown = [s for s in splits if s not in SPLIT_FILES]
    if unknown:
        parser.error(f"--splits: unknown split {unknown[0]} (choose from {', '.join(SPLIT_FILES)})")
    for split in splits:
        if not (args.data / SPLIT_FILES[split]).exists():
            raise SystemExit(f"error: {args.data / SPLIT_FILES[split]}: not found; run `make data-eval` (or models.harvest)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    wanted = DIRECTIONS if args.directions == "all" else [tuple(d.split("-")) for d in args.directions.split(",")]
    by_split = {split: evaluate_split(model, tokenizer, args.data, split, wanted, args.per_direction) for split in splits}
    results = by_split[splits[0]]["results"]
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "per_direction": args.per_direction, "split": splits[0],
                                        "sha256": by_split[splits[0]]["sha256"], "results": results, "splits": by_split},
                                       indent=2, ensure_ascii=False) + "\n")
    if args.floor is not None:
        low = {d: results[d]["chrf++"] for d in args.floor_directions.split(",") if d in results and results[d]["chrf++"] < args.floor}
        if low:
            print(f"error: {args.model}: chrF++ below the floor {args.floor} for "
                  + ", ".join(f"{d} ({v:.1f})" for d, v in low.items()) + "; the model regressed or the test data changed",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
