"""Size for quality cells of `make experiments` (issue 18 parts 2-3): merge vs drop, and top-k reduction.

On the first pack (routing-mass / uniform plans by default, so every result also loads in
llama.cpp), scored like every other cell (packager.experiment_cells):
- merge vs drop: at each `reduce_drops` ratio the parent is pruned twice, dropping
  (packager.prune) and merging (packager.merge, partners from the train split's records of the
  pack's directions), and both checkpoints are scored.
- top-k: the parent and the first drop ratio's pruned checkpoint served at k=1
  (packager.topk, uniform) next to k=2, with decode speed measured in llama.cpp (F16 GGUF, one
  thread, greedy, the first `reduce_speed_prompts` prompts of the sample; `reduce_speed_repeats`
  passes per model, interleaved with the other k; `decode_speeds`).
- per-layer top-k: k=1 in some MoE layers only, in transformers (the routers' k set in memory).
  Quality only: llama.cpp reads one `expert_used_count` per model and the ONNX exporter writes
  one k for every layer, so no runtime we export to serves it and there is no speed to measure.
A merged and a dropped checkpoint of one plan share the router-only model fingerprint, and a
top-k copy shares its weights, so these cells are keyed by `model_identity` (the fingerprint
plus the sha256 of the config and weight files) instead.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from packager.core.pruned_model import layer_top_k  # noqa: F401 - the in-memory per-layer k (also used by tests)


def model_identity(path: Path) -> str:
    from packager.core.fingerprint import model_fingerprint
    from packager.experiment_cells import digest
    from runtime.file_hash import file_sha256

    files = sorted(p for p in Path(path).iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    return digest({"fingerprint": model_fingerprint(path), "files": {p.name: file_sha256(p) for p in files}})


def decode_speeds(model_dirs: list[Path], work: Path, sources: list[str], src: str, tgt: str, repeats: int) -> list[dict]:
    """llama.cpp speed of each model (F16 GGUF, one thread), passes interleaved A B A B ... so that a
    shared machine's load hits every model alike; cached in `work`. Per model: the median decode
    tok/s (wall clock) and generated tokens per CPU second of the process (prefill included),
    which other processes on the machine barely change."""
    from converters.gguf.export import export_gguf
    from runtime.atomic import atomic_write_json
    from runtime.backends import open_backend

    cache = work / "speed.json"
    identities = [model_identity(d) for d in model_dirs]
    setup = {"identities": identities, "prompts": len(sources), "repeats": repeats}
    if cache.is_file():
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("setup") == setup:
            return data["speeds"]
    work.mkdir(parents=True, exist_ok=True)
    backends, runs = [], [{"wall": [], "cpu": [], "tokens": 0} for _ in model_dirs]
    try:
        for i, model_dir in enumerate(model_dirs):
            gguf = work / f"model-{i}.f16.gguf"
            export_gguf(model_dir, gguf, None, dtype="f16", force=True, hash_inputs=False)
            backends.append((open_backend(gguf, n_threads=1), gguf))
            backends[-1][0].translate(sources[0], src, tgt, max_new_tokens=32)   # warm-up
        for _ in range(repeats):
            for (backend, _), run in zip(backends, runs):
                backend.timings.reset()
                cpu = time.process_time()
                for text in sources:
                    backend.translate(text, src, tgt, max_new_tokens=128)
                cpu = time.process_time() - cpu
                run["wall"].append(backend.timings.decode_tokens_per_second)
                run["cpu"].append(backend.timings.decode_tokens / cpu)
                run["tokens"] = backend.timings.decode_tokens
    finally:
        for backend, gguf in backends:
            backend.close()
            gguf.unlink(missing_ok=True)
    speeds = [{"decode_tok_s": round(statistics.median(r["wall"]), 1), "decode_tok_s_runs": [round(x, 1) for x in r["wall"]],
               "tokens_per_cpu_s": round(statistics.median(r["cpu"]), 1), "decode_tokens_per_run": r["tokens"],
               "runtime": "llama.cpp F16, 1 thread"} for r in runs]
    atomic_write_json(cache, {"setup": setup, "speeds": speeds})
    return speeds


def _calibration_file(exp, slugs: list[str], limit: int) -> Path:
    """The first `limit` train records of the pack's directions (merge partners are chosen on them)."""
    from runtime.atomic import atomic_write_text

    path = exp.out_dir / "models" / f"merge-calib-{'-'.join(slugs)}-{limit}.jsonl"
    if not path.is_file():
        rows = []
        with (exp.data_dir / "train.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if f"{record.get('src_lang')}-{record.get('tgt_lang')}" in slugs:
                    rows.append(line if line.endswith("\n") else line + "\n")
                    if len(rows) >= limit:
                        break
        atomic_write_text(path, "".join(rows))
    return path


def _score_dir(exp, path: Path, slugs: list[str], label: str, n: int) -> dict:
    identity = model_identity(path)
    exp.load_model_dir(path, key=identity)
    directions = {slug: exp.evaluate(identity, slug, label=label, n=n) for slug in slugs}
    return {"dir": str(path), "identity": identity, "directions": directions, "mean": exp.summarize(directions)}


def merge_vs_drop(exp, langs, slugs: list[str], n: int) -> list[dict]:
    from packager.merge import merge_prune
    from packager.planning import PlanSettings, make_plan
    from packager.prune import prune_checkpoint

    config = exp.config
    calib = _calibration_file(exp, slugs, config.reduce_merge_records)
    rows = []
    for drop in config.reduce_drops:
        tag = f"{int(round(drop * 1000)):04d}"
        plan = make_plan(exp.stats, PlanSettings(langs=tuple(langs), direction="en-x", drop_ratio=drop,
                                                 ranker=config.reduce_ranker, allocation=config.reduce_allocation,
                                                 seed=config.seed))
        row = {"drop_ratio": drop, "counts": [len(plan.keep[i]) for i in sorted(plan.keep)]}
        for reduce in ("drop", "merge"):
            out = exp.out_dir / "models" / f"reduce-{reduce}-{tag}"
            if not _made_from(out, plan, calib if reduce == "merge" else None):
                if reduce == "drop":
                    prune_checkpoint(exp.model_dir, plan, out, force=True)
                else:
                    merge_prune(exp.model_dir, plan, out, stats=exp.stats, calib=[calib],
                                max_records=config.reduce_merge_records, force=True)
            row[reduce] = _score_dir(exp, out, slugs, f"{reduce} {drop}", n)
        rows.append(row)
    return rows


def _made_from(out: Path, plan, calib: Path | None) -> bool:
    """`out` holds `plan` pruned (and, with `calib`, merged with partners chosen on all of calib's records)."""
    from packager.prune import read_provenance

    record = read_provenance(out) if out.is_dir() else None
    if record is None or record.get("plan", {}).get("sha256") != plan.sha256():
        return False
    if calib is None:
        return record.get("reduce", "drop") == "drop"
    records = sum(1 for line in calib.read_text(encoding="utf-8").splitlines() if line.strip())
    return record.get("reduce") == "merge" and record.get("merge", {}).get("partner", "").endswith(f"({records} records)")


def top_k_rows(exp, slugs: list[str], n: int, first_drop_dir: Path | None) -> list[dict]:
    from packager.topk import reduce_top_k

    config = exp.config
    src, tgt = slugs[0].split("-")
    sources = [s.src for s in exp.samples[slugs[0]][0][:config.reduce_speed_prompts]]
    rows = []
    models = [("parent", exp.model_dir)] + ([(f"{100 * config.reduce_drops[0]:g}% dropped", first_drop_dir)]
                                            if first_drop_dir else [])
    for name, source in models:
        reduced = exp.out_dir / "models" / f"top1-{Path(source).name}"
        if not (reduced / "reduction.json").is_file() or json.loads(
                (reduced / "reduction.json").read_text(encoding="utf-8"))["input"]["fingerprint"] != _fingerprint(source):
            reduce_top_k(source, reduced, 1, force=True)
        pair = [(exp.stats.top_k, Path(source)), (1, reduced)]
        speeds = (decode_speeds([p for _, p in pair], exp.out_dir / "speed" / Path(source).name, sources, src, tgt,
                                config.reduce_speed_repeats) if config.reduce_speed_prompts else [None, None])
        for (k, path), speed in zip(pair, speeds):
            row = {"model": name, "top_k": k, **_score_dir(exp, path, slugs, f"{name} k={k}", n)}
            if speed is not None:
                row["speed"] = speed
            rows.append(row)
    return rows


def _fingerprint(path) -> str:
    from packager.core.fingerprint import model_fingerprint

    return model_fingerprint(path)


def per_layer_top_k_rows(exp, slugs: list[str], n: int) -> list[dict]:
    """k=1 in the first half of the MoE layers, then in the second half (the parent, transformers)."""
    layers = list(exp.stats.moe_layers)
    half = len(layers) // 2
    rows = []
    for name, ones in (("first half k=1", layers[:half]), ("second half k=1", layers[half:])):
        ks = {i: (1 if i in ones else exp.stats.top_k) for i in layers}
        key = f"{exp.parent.fingerprint}+top_k{[ks[i] for i in layers]}"
        with layer_top_k(exp.parent.model, ks) as model:
            directions = {slug: exp.evaluate(key, slug, model=model, label=name, n=n) for slug in slugs}
        rows.append({"setting": name, "per_layer_k": [ks[i] for i in layers], "directions": directions,
                     "mean": exp.summarize(directions)})
    return rows


def reduce_stage(exp) -> dict:
    """Merge vs drop, uniform and per-layer top-k (module docstring)."""
    config = exp.config
    langs = config.packs[0]
    slugs = exp.pack_slugs(langs)
    n = exp.pack_n(langs)
    started = time.monotonic()
    (exp.out_dir / "models").mkdir(parents=True, exist_ok=True)
    parent = {slug: exp.evaluate(exp.parent.fingerprint, slug, label="parent", n=n) for slug in slugs}
    merge = merge_vs_drop(exp, langs, slugs, n)
    first = exp.out_dir / "models" / f"reduce-drop-{int(round(config.reduce_drops[0] * 1000)):04d}" if merge else None
    result = {
        "pack": config.pack_name(langs), "split": config.split, "n_per_direction": n,
        "plan": f"{config.reduce_ranker} / {config.reduce_allocation}",
        "merge_partners": f"first {config.reduce_merge_records} train records of {', '.join(slugs)}",
        "parent": {"directions": parent, "mean": exp.summarize(parent)},
        "merge_vs_drop": merge,
        "top_k": top_k_rows(exp, slugs, n, first),
        "per_layer_top_k": per_layer_top_k_rows(exp, slugs, n),
        "speed_setup": {"prompts": config.reduce_speed_prompts, "repeats": config.reduce_speed_repeats,
                        "runtime": "llama.cpp (llama-cpp-python), F16 GGUF, 1 thread, greedy, max 128 new tokens"},
    }
    exp.timings["reduce"] = round(time.monotonic() - started, 1)
    return result


def n_cells(config) -> int:
    directions = len(config.packs[0])
    return directions * (1 + 2 * len(config.reduce_drops) + 4 + 2)


def _cell(m: dict) -> str:
    return "–" if m.get("chrf++") is None else f"{m['chrf++']:.1f} / {100 * m['error_rate']:.0f}%"


def _num(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def reduce_section(reduce: dict) -> list[str]:
    """The page's section for the reduce stage."""
    split = reduce["split"]
    lines = ["", f"## Merge vs drop, top-k reduction ({reduce['pack']}, {split} split)", "",
             f"{reduce['n_per_direction']} {split} sentences per direction; plan {reduce['plan']}; merge partners from the "
             f"{reduce['merge_partners']}. Cells are chrF++ / generation-error rate; parent {_cell(reduce['parent']['mean'])}.",
             "", "| dropped | experts per layer | drop | merge |", "|---|---|---|---|"]
    for r in reduce["merge_vs_drop"]:
        lines.append(f"| {100 * r['drop_ratio']:g}% | {'/'.join(map(str, r['counts']))} | {_cell(r['drop']['mean'])} | "
                     f"{_cell(r['merge']['mean'])} |")
    speed = reduce["speed_setup"]
    lines += ["", f"Top-k reduction (uniform; speed: {speed['runtime']}, {speed['prompts']} prompts, median of "
              f"{speed['repeats']} passes per model, interleaved with the other k; tokens per CPU second: generated "
              "tokens over the process's CPU time, prefill included, which other load on the machine barely "
              "changes):", "", "| model | top-k | chrF++ / errors | decode tok/s (wall) | tokens per CPU s |",
              "|---|---|---|---|---|"]
    for r in reduce["top_k"]:
        sp = r.get("speed") or {}
        lines.append(f"| {r['model']} | {r['top_k']} | {_cell(r['mean'])} | {_num(sp.get('decode_tok_s'))} | "
                     f"{_num(sp.get('tokens_per_cpu_s'))} |")
    lines += ["", "Per-layer top-k (the parent in transformers; no runtime we export to serves a per-layer k: "
              "llama.cpp reads one expert_used_count per model, the ONNX exporter writes one k):", "",
              "| setting | k per MoE layer | chrF++ / errors |", "|---|---|---|"]
    for r in reduce["per_layer_top_k"]:
        lines.append(f"| {r['setting']} | {'/'.join(map(str, r['per_layer_k']))} | {_cell(r['mean'])} |")
    return lines

