"""Size for quality cells of `make experiments` (issue 18 parts 2-3): merge vs drop, and top-k reduction.

On the first pack (routing-mass / uniform plans by default, so every result also loads in
llama.cpp), scored like every other cell (packager.experiment_cells):
- merge vs drop: at each `reduce_drops` ratio the parent is pruned by dropping (packager.prune)
  and by merging (packager.merge, partners from the train split's records of the pack's
  directions): averaging as stored, and once per `reduce_merge_aligns` method with each dropped
  expert's neurons aligned to its partner's first; every checkpoint is scored.
- top-k: the parent and the first drop ratio's pruned checkpoint served at k=1
  (packager.topk, uniform) next to k=2, with decode speed measured in llama.cpp (F16 GGUF, one
  thread, greedy, the first `reduce_speed_prompts` prompts of the sample; `reduce_speed_repeats`
  passes per model, interleaved with the other k; `decode_speeds`).
- per-layer top-k: k=1 in some MoE layers only; quality in transformers (the routers' k set in
  memory), decode speed in ONNX Runtime (fp32, one thread, `reduce_speed_prompts` prompts and
  `reduce_speed_repeats` passes, interleaved with the parent at k=top-k and at k=1 everywhere;
  checkpoints written by packager.topk). llama.cpp reads one `expert_used_count` per model and
  does not serve a per-layer k.
A merged and a dropped checkpoint of one plan share the router-only model fingerprint, and a
top-k copy shares its weights, so these cells are keyed by `model_identity` (the fingerprint
plus the sha256 of the config and weight files) instead.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from packager.core.pruned_model import layer_top_k


def model_identity(path: Path) -> str:
    from packager.core.fingerprint import model_fingerprint
    from packager.experiment_cells import digest
    from runtime.file_hash import file_sha256

    files = sorted(p for p in Path(path).iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    return digest({"fingerprint": model_fingerprint(path), "files": {p.name: file_sha256(p) for p in files}})


SPEED_RUNTIMES = {"gguf": "llama.cpp F16, 1 thread", "onnx": "ONNX Runtime fp32, 1 thread"}


def _export_for_speed(model_dir: Path, work: Path, i: int, fmt: str) -> Path:
    if fmt == "onnx":  # ONNX serves a per-layer top-k; llama.cpp does not
        from converters.onnx.export import export_onnx

        return export_onnx(model_dir, work / f"model-{i}.onnx", quant="fp32", force=True, hash_inputs=False, check=False)
    from converters.gguf.export import export_gguf

    return export_gguf(model_dir, work / f"model-{i}.f16.gguf", None, dtype="f16", force=True, hash_inputs=False)


def decode_speeds(model_dirs: list[Path], work: Path, sources: list[str], src: str, tgt: str, repeats: int,
                  fmt: str = "gguf", keep_outputs: bool = False) -> list[dict]:
    """Speed of each model in llama.cpp (F16 GGUF) or ONNX Runtime (fp32), one thread, passes
    interleaved A B A B ... so that a shared machine's load hits every model alike; cached in
    `work`. Per model: the median decode tok/s (wall clock) and generated tokens per CPU second
    of the process (prefill included), which other processes on the machine barely change; with
    `keep_outputs`, the first pass's translations too (greedy: every pass gives the same)."""
    import shutil

    from runtime.atomic import atomic_write_json
    from runtime.backends import open_backend

    cache = work / "speed.json"
    identities = [model_identity(d) for d in model_dirs]
    setup = {"identities": identities, "prompts": len(sources), "repeats": repeats}
    if fmt != "gguf":  # GGUF caches written before ONNX was measured stay valid
        setup["format"] = fmt
    if keep_outputs:
        setup["outputs"] = True
    if cache.is_file():
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("setup") == setup:
            return data["speeds"]
    work.mkdir(parents=True, exist_ok=True)
    backends, runs = [], [{"wall": [], "cpu": [], "tokens": 0, "outputs": None} for _ in model_dirs]
    try:
        for i, model_dir in enumerate(model_dirs):
            exported = _export_for_speed(Path(model_dir), work, i, fmt)
            backends.append((open_backend(exported, n_threads=1), exported))
            backends[-1][0].translate(sources[0], src, tgt, max_new_tokens=32)   # warm-up
        for _ in range(repeats):
            for (backend, _), run in zip(backends, runs):
                backend.timings.reset()
                cpu = time.process_time()
                outputs = [backend.translate(text, src, tgt, max_new_tokens=128) for text in sources]
                cpu = time.process_time() - cpu
                run["wall"].append(backend.timings.decode_tokens_per_second)
                run["cpu"].append(backend.timings.decode_tokens / cpu)
                run["tokens"] = backend.timings.decode_tokens
                run["outputs"] = run["outputs"] or outputs
    finally:
        for backend, exported in backends:
            backend.close()
            if exported.is_dir():
                shutil.rmtree(exported)
            else:
                exported.unlink(missing_ok=True)
    speeds = [{"decode_tok_s": round(statistics.median(r["wall"]), 1), "decode_tok_s_runs": [round(x, 1) for x in r["wall"]],
               "tokens_per_cpu_s": round(statistics.median(r["cpu"]), 1), "decode_tokens_per_run": r["tokens"],
               "runtime": SPEED_RUNTIMES[fmt], **({"outputs": r["outputs"]} if keep_outputs else {})} for r in runs]
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
        row = {"drop_ratio": drop, "counts": [len(plan.keep[i]) for i in sorted(plan.keep)], "merge_aligned": {}}
        variants = [("drop", None), ("merge", "none")] + [(f"merge-{a}", a) for a in config.reduce_merge_aligns]
        for name, align in variants:
            out = exp.out_dir / "models" / f"reduce-{name}-{tag}"
            if not _made_from(out, plan, calib if align else None, align):
                if align is None:
                    prune_checkpoint(exp.model_dir, plan, out, force=True)
                else:
                    merge_prune(exp.model_dir, plan, out, stats=exp.stats, calib=[calib], align=align,
                                max_records=config.reduce_merge_records, force=True)
            cell = _score_dir(exp, out, slugs, f"{name} {drop}", n)
            if align in (None, "none"):
                row[name] = cell
            else:
                row["merge_aligned"][align] = cell
        rows.append(row)
    return rows


def _made_from(out: Path, plan, calib: Path | None, align: str | None = None) -> bool:
    """`out` holds `plan` pruned (and, with `calib`, merged with partners chosen on all of calib's records,
    neurons aligned by `align`; merges written before alignment existed record none and were not aligned)."""
    from packager.prune import read_provenance

    record = read_provenance(out) if out.is_dir() else None
    if record is None or record.get("plan", {}).get("sha256") != plan.sha256():
        return False
    if calib is None:
        return record.get("reduce", "drop") == "drop"
    records = sum(1 for line in calib.read_text(encoding="utf-8").splitlines() if line.strip())
    merge = record.get("merge", {})
    return (record.get("reduce") == "merge" and merge.get("partner", "").endswith(f"({records} records)")
            and merge.get("align", {}).get("method", "none") == align)


def _reduced(source: Path, out: Path, top_k) -> Path:
    """`out` = `source` served at `top_k` (one k or one per MoE layer), written unless it already is."""
    from packager.topk import REDUCTION_NAME, reduce_top_k

    path = out / REDUCTION_NAME
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if record is None or record["input"]["fingerprint"] != _fingerprint(source) or record["top_k"]["to"] != top_k:
        reduce_top_k(source, out, top_k, force=True)
    return out


def top_k_rows(exp, slugs: list[str], n: int, first_drop_dir: Path | None) -> list[dict]:
    config = exp.config
    src, tgt = slugs[0].split("-")
    sources = [s.src for s in exp.samples[slugs[0]][0][:config.reduce_speed_prompts]]
    rows = []
    models = [("parent", exp.model_dir)] + ([(f"{100 * config.reduce_drops[0]:g}% dropped", first_drop_dir)]
                                            if first_drop_dir else [])
    for name, source in models:
        reduced = _reduced(source, exp.out_dir / "models" / f"top1-{Path(source).name}", 1)
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


def per_layer_onnx_speeds(exp, slugs: list[str], per_layer: list[dict]) -> list[dict]:
    """ONNX Runtime decode speed (fp32, one thread) of the parent at k=top-k everywhere, at each
    per-layer row's k and at k=1 everywhere: ONNX is the runtime that serves a per-layer k."""
    config = exp.config
    if not config.reduce_speed_prompts:
        return []
    layers = list(exp.stats.moe_layers)
    settings = []
    for ks in [[exp.stats.top_k] * len(layers)] + [r["per_layer_k"] for r in per_layer] + [[1] * len(layers)]:
        if ks not in settings:
            settings.append(ks)
    dirs = [exp.model_dir if set(ks) == {exp.stats.top_k} else
            _reduced(exp.model_dir, exp.out_dir / "models" / f"topk-{'-'.join(map(str, ks))}",
                     ks if len(set(ks)) > 1 else ks[0]) for ks in settings]
    src, tgt = slugs[0].split("-")
    sources = [s.src for s in exp.samples[slugs[0]][0][:config.reduce_speed_prompts]]
    speeds = decode_speeds(dirs, exp.out_dir / "speed" / "per-layer-onnx", sources, src, tgt,
                           config.reduce_speed_repeats, fmt="onnx")
    return [{"per_layer_k": ks, "speed": speed} for ks, speed in zip(settings, speeds)]


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
    per_layer = per_layer_top_k_rows(exp, slugs, n)
    first = exp.out_dir / "models" / f"reduce-drop-{int(round(config.reduce_drops[0] * 1000)):04d}" if merge else None
    result = {
        "pack": config.pack_name(langs), "split": config.split, "n_per_direction": n,
        "plan": f"{config.reduce_ranker} / {config.reduce_allocation}",
        "merge_partners": f"first {config.reduce_merge_records} train records of {', '.join(slugs)}",
        "merge_aligns": list(config.reduce_merge_aligns),
        "parent": {"directions": parent, "mean": exp.summarize(parent)},
        "merge_vs_drop": merge,
        "top_k": top_k_rows(exp, slugs, n, first),
        "per_layer_top_k": per_layer,
        "per_layer_onnx_speed": per_layer_onnx_speeds(exp, slugs, per_layer),
        "speed_setup": {"prompts": config.reduce_speed_prompts, "repeats": config.reduce_speed_repeats,
                        "runtime": "llama.cpp (llama-cpp-python), F16 GGUF, 1 thread, greedy, max 128 new tokens"},
    }
    exp.timings["reduce"] = round(time.monotonic() - started, 1)
    return result


def n_cells(config) -> int:
    directions = len(config.packs[0])
    return directions * (1 + (2 + len(config.reduce_merge_aligns)) * len(config.reduce_drops) + 4 + 2)


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
             ""]
    aligns = reduce.get("merge_aligns", [])   # results written before alignment existed have none
    if aligns:
        lines += ["Aligned merges permute each dropped expert's neurons onto its partner's before averaging "
                  "(packager.merge, `--merge-align`).", ""]
    header = ["dropped", "experts per layer", "drop", "merge"] + [f"merge, aligned on {a}" for a in aligns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in reduce["merge_vs_drop"]:
        cells = [f"{100 * r['drop_ratio']:g}%", "/".join(map(str, r["counts"])), _cell(r["drop"]["mean"]),
                 _cell(r["merge"]["mean"])] + [_cell(r["merge_aligned"][a]["mean"]) for a in aligns]
        lines.append("| " + " | ".join(cells) + " |")
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
    lines += ["", "Per-layer top-k (quality: the parent in transformers, the routers' k set in memory; speed: "
              "ONNX Runtime fp32, one thread, same prompts and passes, interleaved with the uniform k; llama.cpp "
              "reads one expert_used_count per model and does not serve it):", "",
              "| setting | k per MoE layer | chrF++ / errors | ONNX decode tok/s (wall) | tokens per CPU s |",
              "|---|---|---|---|---|"]
    onnx = {tuple(r["per_layer_k"]): r["speed"] for r in reduce.get("per_layer_onnx_speed", [])}
    uniform = [(f"every layer k={ks[0]}", list(ks)) for ks in onnx if len(set(ks)) == 1]
    quality = {tuple(r["per_layer_k"]): _cell(r["mean"]) for r in reduce["per_layer_top_k"]}
    quality.update({ks: _cell(r["mean"]) for ks in onnx for r in reduce["top_k"]
                    if r["model"] == "parent" and len(set(ks)) == 1 and r["top_k"] == ks[0]})
    for name, ks in uniform[:1] + [(r["setting"], r["per_layer_k"]) for r in reduce["per_layer_top_k"]] + uniform[1:]:
        sp = onnx.get(tuple(ks), {})
        lines.append(f"| {name} | {'/'.join(map(str, ks))} | {quality.get(tuple(ks), '–')} | "
                     f"{_num(sp.get('decode_tok_s'))} | {_num(sp.get('tokens_per_cpu_s'))} |")
    return lines

