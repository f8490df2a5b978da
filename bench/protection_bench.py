"""Placeholder protection on the demo's calibrated pruned bundles (issue 17; minutes, not part of
`make test` or `make bench`): chrF++ and the lost-placeholder rate of the parent and the 50% / 75%
routing-mass uniform GGUF bundles, en->de and en->fr, three ways:
- raw: no protection (`edge-translate --no-protect`);
- sentinels: every piece with placeholders or markup sent with sentinels at once (the runtime's
  earlier behaviour, `TextTranslator(raw_first=False)`);
- raw first (the runtime's default): the raw translation, and sentinels only for a piece whose
  raw translation lost a span.

It builds the bundles with `packager build` from a packs file like packs/demo.toml (same
calibration and verification settings; only F16 GGUF, drop ratios 0.5 and 0.75, packs en-de and
en-fr), then runs `packager verify` on each (its `protection` block gives raw first against raw)
on two test sets: the demo's fixed split (data/harvest/eval/test.jsonl, LibreOffice only, few
placeholders) and the full harvested test split (data/harvest/test.jsonl), 200 segments per
direction, one thread. The sentinel figures come from translating the same segments' protected
ones again in-process, greedy and one at a time as verify does. Writes
bench/results/protection.json.

    python -m bench.protection_bench [--work /tmp/protection-bench]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "protection.json"
SPLITS = {"eval": REPO / "data" / "harvest" / "eval" / "test.jsonl", "full": REPO / "data" / "harvest" / "test.jsonl"}
LIMIT = 200
MAX_NEW_TOKENS = 128
PACKS = """# written by bench/protection_bench.py: packs/demo.toml's settings, F16 GGUF at 50% and 75%
parent = "{parent}"
drop_ratios = [0.5, 0.75]
ranker = "routing-mass"
threads = 1
archive = false

[calibration]
data = ["{dev}"]
max_sentences = 64
max_new_tokens = 48
batch_size = 16

[verify]
test = "{test}"
limit = {limit}
max_new_tokens = {max_new_tokens}
bootstrap = 0

[[variant]]
format = "gguf"
allocation = "uniform"
quant = ["F16"]

[[pack]]
name = "en-de"
directions = "en->de"

[[pack]]
name = "en-fr"
directions = "en->fr"
"""
MODELS = {  # name -> (path under the run directory, directions)
    "parent": ("parent/gguf", "en-de,en-fr"),
    "en-de 50%": ("bundles/en-de-gguf-F16-d50-uniform", "en-de"),
    "en-de 75%": ("bundles/en-de-gguf-F16-d75-uniform", "en-de"),
    "en-fr 50%": ("bundles/en-fr-gguf-F16-d50-uniform", "en-fr"),
    "en-fr 75%": ("bundles/en-fr-gguf-F16-d75-uniform", "en-fr"),
}


def _packager(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "packager.cli", *args], cwd=REPO, check=True)


def _sentinel_hyps(model: Path, segments: list[dict]) -> dict[int, str]:
    """Hypotheses of the protected segments with sentinels at once (index -> text)."""
    from runtime.backends import open_backend
    from runtime.protect import protect
    from runtime.translator import TextTranslator

    with open_backend(model, n_threads=1) as backend:
        core = TextTranslator(backend, max_new_tokens=MAX_NEW_TOKENS, batch_size=1, raw_first=False)
        out = {}
        for index, row in enumerate(segments):
            if protect(row["src"]).changed:
                src, tgt = row["direction"].split("-")
                out[index] = core.translate_detailed(row["src"], src, tgt)["hyp"].strip()
    return out


def _score(segments: list[dict], hyps: list[str], tgt: str) -> dict:
    from packager.quality import corpus_scores, lost_placeholders, placeholders

    lost = [bool(lost_placeholders(row["src"], hyp)) for row, hyp in zip(segments, hyps)]
    having = [bool(placeholders(row["src"])) for row in segments]
    return {"chrf++": corpus_scores(hyps, [row["ref"] for row in segments], tgt)["chrf++"], "lost_placeholder": sum(lost),
            "lost_placeholder_rate": round(sum(lost) / len(lost), 4),
            "lost_among_with_placeholders": round(sum(l for l, h in zip(lost, having) if h) / max(1, sum(having)), 4)}


def _measure(model: Path, dirs: str, test: Path, out: Path) -> dict:
    metrics_path = out.with_suffix(".json")
    if not metrics_path.is_file():
        _packager("verify", str(model), "--test", str(test), "--pairs", dirs, "--limit", str(LIMIT), "--threads", "1",
                  "--max-new-tokens", str(MAX_NEW_TOKENS), "--bootstrap", "0", "--out", str(metrics_path))
    metrics = json.loads(metrics_path.read_text())
    segments = [json.loads(line) for line in metrics_path.with_suffix(".segments.jsonl").open(encoding="utf-8")]
    sentinels = _sentinel_hyps(model, segments)
    result = {}
    for slug, direction in metrics["directions"].items():
        rows = [(i, row) for i, row in enumerate(segments) if row["direction"] == slug]
        chosen = [row for _, row in rows]
        tgt = direction["tgt_lang"]
        protection = direction["protection"]
        result[slug] = {
            "segments": len(chosen), "segments_with_placeholders": protection["segments_with_placeholders"],
            "segments_protected": protection["segments_protected"],
            "raw": _score(chosen, [row.get("hyp_unprotected", row["hyp"]) for row in chosen], tgt),
            "sentinels": _score(chosen, [sentinels.get(i, row["hyp"]) for i, row in rows], tgt),
            "raw_first": _score(chosen, [row["hyp"] for row in chosen], tgt),
            "raw_first_retries": protection.get("sentinel_retries"),
            "raw_first_fallbacks": protection["sentinel_fallbacks"],
            "verify_protection_block": protection,
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/protection-bench"))
    args = parser.parse_args()
    missing = [str(p) for p in (*SPLITS.values(), REPO / "models" / "default" / "config.json") if not p.is_file()]
    if missing:
        print(f"protection_bench: {', '.join(missing)} missing (make data-full / train-default); skipped", file=sys.stderr)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    packs = args.work / "packs.toml"
    packs.write_text(PACKS.format(parent=REPO / "models" / "default", dev=REPO / "data" / "harvest" / "eval" / "dev.jsonl",
                                  test=SPLITS["eval"], limit=LIMIT, max_new_tokens=MAX_NEW_TOKENS), encoding="utf-8")
    started = time.perf_counter()
    _packager("build", str(packs), "--out", str(args.work / "run"))
    results = {}
    for split, test in SPLITS.items():
        for name, (path, dirs) in MODELS.items():
            print(f"protection_bench: {split} {name}", file=sys.stderr, flush=True)
            out = args.work / "verify" / split / name.replace(" ", "-").replace("%", "")
            out.parent.mkdir(parents=True, exist_ok=True)
            results.setdefault(split, {})[name] = _measure(args.work / "run" / path, dirs, test, out)
    record = {"benchmark": "protection", "model": "models/default (F16 GGUF), routing-mass uniform plans",
              "limit_per_direction": LIMIT, "max_new_tokens": MAX_NEW_TOKENS, "threads": 1,
              "splits": {k: str(v.relative_to(REPO)) for k, v in SPLITS.items()}, "results": results,
              "seconds": round(time.perf_counter() - started, 1),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for split, models in results.items():
        for name, directions in models.items():
            for slug, r in directions.items():
                print(f"{split:4s} {name:10s} {slug}: chrF++ raw {r['raw']['chrf++']:.2f} sentinels {r['sentinels']['chrf++']:.2f} "
                      f"raw-first {r['raw_first']['chrf++']:.2f}; lost {r['raw']['lost_placeholder']} / "
                      f"{r['sentinels']['lost_placeholder']} / {r['raw_first']['lost_placeholder']} of {r['segments']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
