"""The Markdown page of a run (docs/results.md): findings computed from the numbers, then tables."""
from __future__ import annotations

import statistics
from pathlib import Path

from packager.experiments.plots import slug as plot_slug

def _budget(budget: dict) -> str:
    parts = []
    if budget.get("minutes"):
        parts.append(f"{budget['minutes']:g} minutes")
    if budget.get("max_steps"):
        parts.append(f"{budget['max_steps']} steps")
    return " or ".join(parts)


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(rate) -> str:
    return "–" if rate is None else f"{100 * rate:.0f}%"


def findings(results: dict) -> list[str]:
    """Plain statements computed from the numbers (whichever way they go)."""
    config = results["setup"]["config"]
    sweep = [r for r in results["sweep"] if "error" not in r]
    lines = []

    def score(pack, ranker, allocation, drop):
        for r in sweep:
            if (r["pack"], r["ranker"], r["allocation"], r["drop"]) == (pack, ranker, allocation, drop):
                return r["mean"]["chrf++"]
        return None

    packs = list(dict.fromkeys(r["pack"] for r in sweep))
    high = [d for d in config["drops"] if d >= 0.5]
    for rival in ("random", "inverted"):
        if rival not in config["rankers"] or "routing-mass" not in config["rankers"]:
            continue
        wins, total, gaps = 0, 0, []
        for pack in packs:
            for drop in high:
                a, b = score(pack, "routing-mass", "uniform", drop), score(pack, rival, "uniform", drop)
                if a is not None and b is not None:
                    total += 1
                    wins += a > b
                    gaps.append(a - b)
        if total:
            lines.append(f"Routing mass vs {rival} ranking (uniform allocation, drops >= 50%): routing mass scores higher in "
                         f"{wins} of {total} pack x drop settings; mean chrF++ difference {statistics.mean(gaps):+.1f}.")
    if {"uniform", "dynamic"} <= set(config["allocations"]):
        cliff = [d for d in config["drops"] if 0.5 < d < max(config["drops"])] or high
        wins, total, gaps = 0, 0, []
        for pack in packs:
            for drop in cliff:
                a, b = score(pack, "routing-mass", "dynamic", drop), score(pack, "routing-mass", "uniform", drop)
                if a is not None and b is not None:
                    total += 1
                    wins += a > b
                    gaps.append(a - b)
        if total:
            text = (f"Dynamic vs uniform allocation (routing mass, drops {', '.join(f'{100 * d:g}%' for d in cliff)}): "
                    f"dynamic scores higher in {wins} of {total} settings; mean chrF++ difference {statistics.mean(gaps):+.1f}.")
            top = max(config["drops"])
            same = {r["keep_sha256"] for r in sweep if r["drop"] == top and r["ranker"] == "routing-mass"
                    and r["pack"] == packs[0]}
            if len(same) == 1:
                text += f" At {100 * top:g}% every layer keeps exactly top-k experts, so all allocations coincide."
            lines.append(text)
    for pack in packs:
        best = []
        for drop in config["drops"]:
            cands = [r for r in sweep if r["pack"] == pack and r["drop"] == drop]
            if cands:
                top = max(cands, key=lambda r: r["mean"]["chrf++"])
                best.append(f"{100 * drop:g}%: {top['ranker']}/{top['allocation']} {top['mean']['chrf++']:.1f}")
        lines.append(f"Best setting per drop ratio, {pack}: " + "; ".join(best) + ".")
    return lines + _recovery_findings(results)


def _recovery_findings(results: dict) -> list[str]:
    lines = []
    rows = [r for r in results["recovery"]["rows"] if "pruned" in r]
    p = results["parent"]["packs"][results["recovery"]["pack"]]["mean"]["chrf++"]
    # a loss smaller than twice the measured paired-loss noise (or 1 point) has no meaningful share
    sd_loss = (results.get("noise") or {}).get("test_samples", {}).get("sd_loss") or 0.0
    floor = max(1.0, 2 * sd_loss)

    def errors(cell):
        rate = cell["mean"].get("error_rate")
        return f" ({100 * rate:.0f}% errors)" if rate is not None else ""

    for r in rows:
        lost = p - r["pruned"]["mean"]["chrf++"]
        scores = (f"no recovery {r['pruned']['mean']['chrf++']:.1f}{errors(r['pruned'])}, distillation "
                  f"{r['parent']['mean']['chrf++']:.1f}{errors(r['parent'])}, SFT on references "
                  f"{r['references']['mean']['chrf++']:.1f}{errors(r['references'])}, parent {p:.1f}")
        if lost >= floor:
            shares = {k: (r[k]["mean"]["chrf++"] - r["pruned"]["mean"]["chrf++"]) / lost for k in ("parent", "references")}
            lines.append(f"At {100 * r['drop']:g}% dropped, pruning loses {lost:.1f} chrF++; distillation recovers "
                         f"{100 * shares['parent']:.0f}% of it, SFT on references {100 * shares['references']:.0f}% "
                         f"({scores}).")
        else:
            lines.append(f"At {100 * r['drop']:g}% dropped, pruning changes chrF++ by {-lost:+.1f}, under the noise floor of "
                         f"{floor:.1f} (2 x the measured sd of the loss, at least 1): no recovery share is meaningful "
                         f"({scores}).")
    return lines


def render_markdown(results: dict, out_dir: Path, md_path: Path) -> str:
    lines = _header(results)
    lines += [f"- {text}" for text in findings(results)]
    lines += _parent_table(results)
    for pack in dict.fromkeys(r["pack"] for r in results["sweep"]):
        lines += _sweep_section(results, out_dir, pack)
    lines += _recovery_section(results)
    if results.get("reduce"):
        from packager.experiments.reduce import reduce_section

        lines += reduce_section(results["reduce"])
    lines += _overlap_and_noise(results, out_dir)
    return "\n".join(lines)


def _header(results: dict) -> list[str]:
    config = results["setup"]["config"]
    model = results["model"]
    return [
        "# Results: the method's findings on the embedded default model",
        "",
        "<!-- generated by `make experiments` (python -m packager.experiments); do not edit by hand -->",
        "",
        f"Generated {results['provenance']['created']} by `{results['provenance']['command']}` "
        f"in {results['timings_seconds'].get('total', 0) / 60:.1f} minutes "
        f"({results['cells']['computed']} cells computed, {results['cells']['cached']} reused from the cache).",
        "",
        "## Setup",
        "",
        f"- Model: `{model['dir']}` ({model['family']}, {len(model['moe_layers'])} MoE layers x {model['n_experts']} experts, "
        f"top-{model['top_k']}, {model['parameters'] / 1e6:.2f}M parameters), fingerprint `{model['fingerprint'][:16]}`, "
        + ", ".join(f"{name} sha256 `{sha[:16]}`" for name, sha in model["weights_sha256"].items()) + ".",
        "- Data: " + ", ".join(f"`{d['path']}` sha256 `{d['sha256'][:16]}`" for d in results["data"].values()) + ".",
        f"- Calibration: {results['setup']['calibration']['mode']} on the dev split, "
        f"{config['calib_sentences']} sentences per direction ({', '.join(results['setup']['calibration']['pairs'])}), REAP included.",
        f"- Evaluation: {config['sample']} test sentences per direction, "
        f"{results['setup']['test_sample']['per_direction_multilingual']} per direction in multilingual packs "
        f"({results['setup']['test_sample']['selection']}); "
        f"{results['setup']['decoding']['kind']} decoding, batch {config['batch_size']}, bound "
        f"{results['setup']['decoding']['max_new_tokens']}. chrF++ and BLEU by sacrebleu; "
        f"generation errors by `packager.quality` (empty, repetition, length ratio, wrong script, wrong language, "
        "lost placeholder), counted apart from quality.",
        f"- Sweep: {results['setup']['mask_mode']}.",
        f"- Recovery: {results['recovery']['sentences_per_direction']} training sentences per direction of the train split "
        f"for {results['recovery']['pack']}, budget {_budget(results['recovery']['budget'])} per run "
        "(SFT and distillation alike), every parameter trained, best dev-loss weights kept.",
        "",
        "## Findings",
        "",
    ]


def _parent_table(results: dict) -> list[str]:
    parent = results["parent"]["directions"]
    lines = ["", "## Parent", "", "| direction | chrF++ | BLEU | errors | errors in references |", "|---|---|---|---|---|"]
    for slug, m in sorted(parent.items()):
        lines.append(f"| {slug} | {_fmt(m['chrf++'])} | {_fmt(m['bleu'])} | {_pct(m['error_rate'])} | {_pct(m['reference_error_rate'])} |")
    return lines


def _sweep_section(results: dict, out_dir: Path, pack: str) -> list[str]:
    config = results["setup"]["config"]
    rows = [r for r in results["sweep"] if r["pack"] == pack]
    pp = results["parent"]["packs"][pack]
    lines = ["", f"## Sweep {pack} (mask mode): chrF++ / generation-error rate", "",
             f"{pp['n_per_direction']} test sentences per direction, mean over the pack's directions; "
             f"parent {_fmt(pp['mean']['chrf++'])} / {_pct(pp['mean']['error_rate'])}.", "",
             "| ranker | allocation | " + " | ".join(f"{100 * d:g}%" for d in config["drops"]) + " |",
             "|---|---|" + "---|" * len(config["drops"])]
    for ranker in config["rankers"]:
        for allocation in config["allocations"]:
            cells = []
            for drop in config["drops"]:
                r = next((r for r in rows if (r["ranker"], r["allocation"], r["drop"]) == (ranker, allocation, drop)), None)
                if r is None or "error" in r:
                    cells.append("n/a")
                else:
                    cells.append(f"{_fmt(r['mean']['chrf++'])} / {_pct(r['mean']['error_rate'])}")
            lines.append(f"| {ranker} | {allocation} | " + " | ".join(cells) + " |")
    lines += ["", f"Plot: `{out_dir / 'plots' / ('sweep-' + plot_slug(pack) + '.png')}`"]
    lines += _frontier_lines(results, rows, pp)
    jsd = (results.get("layer_jsd") or {}).get(pack)
    mass = [r for r in rows if r["ranker"] == "routing-mass" and "counts" in r]
    if mass:
        lines += ["", "Experts kept per MoE layer by the routing-mass plans"
                  + (f"; the per-layer JSD against English that dynamic allocation follows is "
                     f"{' / '.join(f'{v:.3f}' for v in jsd)}" if jsd else "") + ":", "",
                  "| allocation | " + " | ".join(f"{100 * d:g}%" for d in config["drops"]) + " |",
                  "|---|" + "---|" * len(config["drops"])]
        for allocation in config["allocations"]:
            cells = []
            for drop in config["drops"]:
                r = next((r for r in mass if (r["allocation"], r["drop"]) == (allocation, drop)), None)
                cells.append("/".join(map(str, r["counts"])) if r else "n/a")
            lines.append(f"| {allocation} | " + " | ".join(cells) + " |")
    return lines


def _frontier_lines(results: dict, rows: list[dict], parent_pack: dict) -> list[str]:
    """The sweep's size-for-quality frontier: the plans no smaller plan beats on chrF++."""
    from packager.plan_search import pareto_frontier

    points = [{"size_bytes": r["tensor_bytes"], "chrf++": r["mean"]["chrf++"], "row": r}
              for r in rows if "error" not in r and r.get("tensor_bytes")]
    points.append({"size_bytes": results["model"]["tensor_bytes"], "chrf++": parent_pack["mean"]["chrf++"], "row": None})
    lines = ["", "Frontier of this sweep (the smallest plan for each chrF++ level; sizes are the pruned checkpoint's "
             "tensor bytes, MB = 10^6; chosen on the test sample itself, so an optimistic view: "
             "`packager plan search` chooses on a dev split):", "",
             "| size MB | chrF++ / errors | plan | kept per layer |", "|---|---|---|---|"]
    for point in pareto_frontier(points):
        r = point["row"]
        if r is None:
            lines.append(f"| {point['size_bytes'] / 1e6:.1f} | {_fmt(point['chrf++'])} / {_pct(parent_pack['mean']['error_rate'])} "
                         "| parent | all |")
        else:
            lines.append(f"| {point['size_bytes'] / 1e6:.1f} | {_fmt(r['mean']['chrf++'])} / {_pct(r['mean']['error_rate'])} "
                         f"| {r['ranker']} / {r['allocation']} / {100 * r['drop']:g}% | {'/'.join(map(str, r['counts']))} |")
    return lines


def _recovery_section(results: dict) -> list[str]:
    config = results["setup"]["config"]
    best = results["best_plan"]
    rec = results["recovery"]
    lines = ["", f"## Recovery ({rec['pack']}, plan {best['ranker']} / {best['allocation']})", "",
             f"Best plan: {best['criterion']}: {best['mean_chrf++']}.", "",
             "| dropped | experts per layer | no recovery | SFT on references | distillation | parent | steps (SFT / distill) |",
             "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        if "pruned" not in r:
            continue
        p = results["parent"]["packs"][rec["pack"]]["mean"]["chrf++"]

        def cell(key):
            m = r[key]["mean"]
            return f"{_fmt(m['chrf++'])} / {_pct(m['error_rate'])}"

        lines.append(f"| {100 * r['drop']:g}% | {r['counts']} | {cell('pruned')} | {cell('references')} | {cell('parent')} | "
                     f"{_fmt(p)} | {r['references']['training']['step']} / {r['parent']['training']['step']} |")
    lines += ["", "Cells are chrF++ / generation-error rate, mean over the pack's directions. "
              "`pruned_equals_mask` in results.json checks that the pruned files score exactly like the mask mode."]
    extra = [r for r in rec["rows"] if "pruned" not in r]
    if extra:
        lines += ["", "Distillation seed noise: " + "; ".join(
            f"{100 * r['drop']:g}% seed {r['seed']}: {_fmt(r['parent']['mean']['chrf++'])}" for r in extra)
            + " (compare the distillation column above, seed " + str(config["seed"]) + "; another seed samples other "
            "training sentences, so the parent translates them anew, and changes the dev split and the batch order)."]
    return lines


def _overlap_and_noise(results: dict, out_dir: Path) -> list[str]:
    config = results["setup"]["config"]
    lines = ["", "## Mask overlap (routing mass, per-language en->X masks)", "",
             "| dropped | allocation | pairwise IoU (random) | all languages IoU (random) |", "|---|---|---|---|"]
    for r in results["overlap"]:
        if "error" in r:
            lines.append(f"| n/a | | {r['error']} | |")
            continue
        pairwise = ", ".join(f"{p['a']}-{p['b']} {p['iou']:.3f} ({p['random_iou']:.3f})" for p in r["pairwise"])
        lines.append(f"| {100 * r['drop']:g}% | {r['allocation']} | {pairwise} | {r['all']['iou']:.3f} ({r['all']['random_iou']:.3f}) |")
    noise = results["noise"]
    ts, rs = noise["test_samples"], noise["random_seeds"]
    lines += ["", f"## Noise ({noise['pair']})", "",
              f"- Disjoint test samples of {ts['n_each']} sentences, {ts['setting']}: parent "
              + ", ".join(_fmt(r["parent_chrf++"]) for r in ts["rows"]) + f" (sd {_fmt(ts['sd_parent'], 2)}); pruned "
              + ", ".join(_fmt(r["pruned_chrf++"]) for r in ts["rows"]) + f" (sd {_fmt(ts['sd_pruned'], 2)}); "
              f"loss to the parent sd {_fmt(ts['sd_loss'], 2)}.",
              f"- {rs['setting']} with seeds " + ", ".join(f"{r['seed']}: {_fmt(r['chrf++'])}" for r in rs["rows"])
              + f" (sd {_fmt(rs['sd'], 2)}).",
              f"- Bootstrap: every cell in results.json carries a 95% chrF++ interval ({config['bootstrap']} resamples)"
              if config["bootstrap"] else "- Bootstrap intervals were switched off for this run.",
              "- Greedy decoding is deterministic: re-running a cell reproduces it exactly (the cache relies on it).",
              "", f"Raw results: `{out_dir / 'results.json'}`; plots in `{out_dir / 'plots'}`.", ""]
    return lines


def reduce_page(results: dict) -> str:
    """The page of a `--only reduce` run."""
    from packager.experiments.reduce import reduce_section

    model = results["model"]
    config = results["setup"]["config"]
    weights = ", ".join(f"{name} sha256 `{sha[:16]}`" for name, sha in model["weights_sha256"].items())
    lines = ["# Merge vs drop, top-k reduction", "",
             f"<!-- generated by `{results['provenance']['command']}`; do not edit by hand -->", "",
             f"Generated {results['provenance']['created']} in {results['timings_seconds'].get('total', 0) / 60:.1f} minutes "
             f"({results['cells']['computed']} cells computed, {results['cells']['cached']} reused from the cache).", "",
             f"- Model: `{model['dir']}` ({model['family']}, {len(model['moe_layers'])} MoE layers x {model['n_experts']} "
             f"experts, top-{model['top_k']}), {weights}.",
             f"- Calibration: {results['setup']['calibration']['mode']} on the {results['setup']['calibration']['split']} "
             f"split, {config['calib_sentences']} sentences per direction; {config['threads']} torch thread(s)."]
    return "\n".join(lines + reduce_section(results["reduce"]) + [""])
