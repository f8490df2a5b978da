"""`packager plan search`: the best plan under a budget (issue 18, part 1).

A user says what they need (a file size in a format, a RAM footprint, a drop ratio, a loss in
chrF++ against the parent) and gets the best plan that meets it, plus the frontier it was
chosen from.

1. Candidates: every ranker x allocation x drop ratio of `packager.planning` (identical masks
   evaluated once). A GGUF size budget (or `SearchSettings.uniform`, set by a build with a GGUF
   variant) keeps only uniform plans: stock llama.cpp loads one expert count per model.
2. Each candidate is evaluated in mask mode (packager.masking) on a dev file, never the test
   split (records with split = "test" are refused):
   - quality: greedy translations of the dev sources, chrF++ against the references, and the
     generation-error rate (packager.quality);
   - proxy: teacher-forced on the parent's own greedy translations of the same sources, the
     mean per-token KL(parent || pruned) over the translation tokens (`kl`), or the pruned
     model's mean negative log-likelihood of those tokens (`nll`). One forward pass each, no
     decoding, so it is cheap enough to drive the refinement.
3. The proxy's Spearman rank correlation with dev chrF++ over the grid candidates is computed
   and reported (-proxy against chrF++, so +1 means the proxy orders plans as chrF++ does).
4. Choice among the candidates that meet every budget: with --max-loss the smallest plan
   whose dev chrF++ is within the loss (ties: higher chrF++); otherwise the highest dev
   chrF++ (ties: smaller, then lower proxy).
5. Refinement (formats that load per-layer counts): starting from the choice, move one expert
   slot from layer a to layer b (a drops its lowest-ranked kept expert, b takes its best-ranked
   dropped expert, by the candidate's ranker) while the proxy improves; the size does not
   change (equal-shaped layers). The refined plan is then scored on chrF++ and replaces the
   choice only if it meets the budgets and scores at least as well on dev chrF++.
6. Frontier: of every chrF++-scored plan, the ones no smaller plan beats (size ascending,
   chrF++ strictly ascending), with their error rates.

Sizes (`packager.plan_search.SizeModel`):
- `safetensors`: the pruned checkpoint's tensor bytes, exact (packager.prune.describe_prune).
- `gguf:<TYPE>` / `onnx:<QUANT>`: measured. The parent and a uniform top-k prune of it are
  exported once (cached in the work directory); a model file is affine in the kept expert
  count when MoE layers have equal shapes, so bytes = A + B x kept experts reproduces the
  tensor data exactly. Metadata holds provenance strings (paths, the plan) whose length
  varies by a few KB between exports (2.7 KB measured on the default), so the budget is checked against the
  prediction plus METADATA_ALLOWANCE bytes: a chosen plan never exceeds the budget.
  Caveat: llama.cpp's k-quant rules give attention tensors more bits in 8-expert models, so
  for k-quants a plan keeping exactly 8 experts per layer may differ from the affine model.
- RAM (`--max-ram-mb`): an estimate, the model file of the size format (the runtime maps or
  loads all of it) + an f32 KV cache for `ctx_tokens` + `ram_overhead_bytes` (the runtime's
  own baseline, measured by `packager verify` as RSS above the interpreter).

Everything evaluated is cached under the work directory (one JSON per cell, keyed by the
parent's fingerprint, the mask, the dev file's sha256 and the decoding settings), so an
interrupted search resumes where it stopped and a re-run computes nothing.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from packager.pair_data import canonical_keep, digest
from packager.plan_budgets import (
    PROXIES,
    Budgets,
    SearchError,
    SearchSettings,
    SizeModel,
    build_size_model,
    check_size_format,
    parse_size_budget,
)
from packager.plan_eval import Evaluator, read_dev

# the search's public names (settings and sizes live in packager.plan_budgets, evaluation in packager.plan_eval)
__all__ = ["PROXIES", "Budgets", "Evaluator", "SearchError", "SearchResult", "SearchSettings", "SizeModel",
           "build_size_model", "check_size_format", "pareto_frontier", "parse_size_budget", "read_dev", "search",
           "spearman", "write_outputs"]

SEARCH_FORMAT = "edge-packager-plan-search"
SEARCH_VERSION = 1


# ---- small helpers -------------------------------------------------------------------------------
def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho with average ranks for ties; None with fewer than 3 points or no spread."""
    if len(x) != len(y):
        raise ValueError("spearman: lengths differ")
    if len(x) < 3:
        return None

    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="mergesort")
        result = np.empty(len(values))
        i = 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
                j += 1
            result[order[i:j + 1]] = (i + j) / 2.0
            i = j + 1
        return result

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def pareto_frontier(points: Sequence[dict], size_key: str = "size_bytes", quality_key: str = "chrf++") -> list[dict]:
    """Points no smaller-or-equal point beats: size ascending, quality strictly ascending."""
    usable = [p for p in points if p.get(quality_key) is not None and p.get(size_key) is not None]
    ordered = sorted(usable, key=lambda p: (p[size_key], -p[quality_key]))
    frontier, best = [], -math.inf
    for point in ordered:
        if point[quality_key] > best:
            if frontier and frontier[-1][size_key] == point[size_key]:
                continue
            frontier.append(point)
            best = point[quality_key]
    return frontier



# ---- the search ------------------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    keep: dict[int, list[int]]
    ranker: str
    allocation: str
    drop: float
    meta: dict
    origin: str = "grid"
    values: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"name": self.name, "origin": self.origin, "ranker": self.ranker, "allocation": self.allocation,
                "drop": self.drop, "counts": [len(self.keep[i]) for i in sorted(self.keep)],
                "keep": canonical_keep(self.keep), **self.values}


def grid_candidates(stats, settings: SearchSettings, uniform_only: bool) -> tuple[list[Candidate], list[dict]]:
    """Every ranker x allocation x drop plan the statistics allow (duplicate masks once)."""
    from packager.planning import PlanningError, PlanSettings, plan_keep

    rankers = [r for r in settings.rankers if r != "reap" or stats_has_reap(stats)]
    allocations = [a for a in settings.allocations if not uniform_only or a == "uniform"]
    candidates, skipped, seen = [], [], set()
    for drop in settings.drops:
        for ranker in rankers:
            for allocation in allocations:
                name = f"{ranker}/{allocation}/{drop:g}"
                try:
                    keep, meta = plan_keep(stats, PlanSettings(langs=tuple(settings.langs), direction=settings.direction,
                                                               drop_ratio=drop, ranker=ranker, allocation=allocation,
                                                               seed=settings.seed))
                except PlanningError as exc:
                    skipped.append({"name": name, "reason": str(exc)})
                    continue
                mask = digest(canonical_keep(keep))
                if mask in seen:
                    continue
                seen.add(mask)
                candidates.append(Candidate(name, keep, ranker, allocation, drop, meta))
    return candidates, skipped


def stats_has_reap(stats) -> bool:
    return bool(stats.has_reap)


def meets(values: dict, budgets: Budgets, parent_chrf: float) -> list[str]:
    """The budgets a scored candidate breaks (empty list: it meets every one)."""
    broken = []
    if budgets.max_file_bytes is not None and values["size_bytes"] > budgets.max_file_bytes:
        broken.append("max-file")
    if budgets.max_ram_bytes is not None and values["ram_bytes"] > budgets.max_ram_bytes:
        broken.append("max-ram")
    if budgets.min_drop is not None and values["drop_effective"] < budgets.min_drop - 1e-12:
        broken.append("drop")
    if budgets.max_loss is not None and (values.get("chrf++") is None or parent_chrf - values["chrf++"] > budgets.max_loss + 1e-9):
        broken.append("max-loss")
    return broken


def choose(rows: list[dict], budgets: Budgets) -> dict | None:
    feasible = [r for r in rows if not r["broken"]]
    if not feasible:
        return None
    if budgets.max_loss is not None:
        return min(feasible, key=lambda r: (r["size_bytes"], -r["chrf++"], r["proxy"]))
    return min(feasible, key=lambda r: (-r["chrf++"], r["size_bytes"], r["proxy"]))


def refine(candidate: Candidate, stats, settings: SearchSettings, evaluator: Evaluator, n_experts: int, top_k: int,
           advance: Callable[[], None] | None = None) -> tuple[Candidate, list[dict]]:
    """Greedy slot moves between layers while the proxy improves (at most settings.refine_steps moves)."""
    from packager.planning import layer_orders, layer_scores

    scores = layer_scores(stats, list(settings.langs), settings.direction, candidate.ranker, ("sequence",), settings.seed)
    orders = dict(zip(sorted(candidate.keep), layer_orders(scores, candidate.ranker)))
    keep = {i: list(ids) for i, ids in candidate.keep.items()}
    best = evaluator.proxy(keep)[settings.proxy]
    trace = [{"step": 0, "proxy": best, "counts": [len(keep[i]) for i in sorted(keep)]}]
    for step in range(1, settings.refine_steps + 1):
        moves = []
        for a in sorted(keep):
            if len(keep[a]) <= top_k:
                continue
            worst = [e for e in orders[a] if e in keep[a]][-1]
            for b in sorted(keep):
                if b == a or len(keep[b]) >= n_experts:
                    continue
                gain = next(e for e in orders[b] if e not in keep[b])
                trial = {i: list(ids) for i, ids in keep.items()}
                trial[a].remove(worst)
                trial[b] = sorted(trial[b] + [gain])
                trial[a] = sorted(trial[a])
                value = evaluator.proxy(trial)[settings.proxy]
                if advance:
                    advance()
                moves.append((value, a, b, trial))
        if not moves:
            break
        value, a, b, trial = min(moves, key=lambda m: (m[0], m[1], m[2]))
        if value >= best:
            break
        best, keep = value, trial
        trace.append({"step": step, "proxy": value, "moved": {"from_layer": a, "to_layer": b},
                      "counts": [len(keep[i]) for i in sorted(keep)]})
    refined = Candidate(candidate.name + "+refined", keep, candidate.ranker, candidate.allocation, candidate.drop,
                        dict(candidate.meta), origin="refined")
    return refined, trace


@dataclass
class SearchResult:
    chosen: dict | None
    plan: object | None
    rows: list[dict]
    frontier: list[dict]
    correlation: dict
    parent: dict
    budgets: Budgets
    size_model: SizeModel
    refinement: dict
    skipped: list[dict]
    cells: dict

    def to_json(self) -> dict:
        return {"format": SEARCH_FORMAT, "version": SEARCH_VERSION, "budgets": asdict(self.budgets),
                "size_model": self.size_model.to_dict(), "parent": self.parent, "chosen": self.chosen,
                "frontier": self.frontier, "correlation": self.correlation, "refinement": self.refinement,
                "candidates": self.rows, "skipped": self.skipped, "cells": self.cells}


def search(stats, model_dir: Path, dev_path: Path, budgets: Budgets, settings: SearchSettings, work_dir: Path,
           progress: bool = False, provenance: dict | None = None) -> SearchResult:
    """Run the search (module docstring). Raises SearchError when no candidate meets the budgets,
    after scoring everything (the result is still written by the caller through `exc.result`)."""
    from packager.core.arch import load_arch
    from packager.planning import parse_langs

    if settings.proxy not in PROXIES:
        raise SearchError(f"--proxy {settings.proxy!r}: use one of {', '.join(PROXIES)}")
    settings = SearchSettings(**{**asdict(settings), "langs": tuple(parse_langs(settings.langs))})
    work_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = load_arch(config)
    moe_layers = arch.moe_layers(config)
    n_experts, top_k = stats.n_experts, stats.top_k
    evaluator = Evaluator(model_dir, dev_path, settings, work_dir)
    if stats.meta.get("model_fingerprint") != evaluator.fingerprint:
        raise SearchError(f"statistics come from model {str(stats.meta.get('model_fingerprint'))[:16]}..., "
                          f"{model_dir} is {evaluator.fingerprint[:16]}...: calibrate this model")
    size_model = build_size_model(budgets.size_format, model_dir, work_dir, evaluator.fingerprint, config, moe_layers,
                                  n_experts, top_k)
    uniform_only = settings.uniform or budgets.size_format.startswith("gguf")
    candidates, skipped = grid_candidates(stats, settings, uniform_only)
    if not candidates:
        raise SearchError("no candidate plan: every ranker x allocation x drop was refused (see --drops)")
    parent_quality = evaluator.quality(None)
    parent_chrf = parent_quality["chrf++"]
    total_experts = n_experts * len(moe_layers)

    def score(candidate: Candidate) -> dict:
        proxy = evaluator.proxy(candidate.keep)
        quality = evaluator.quality(candidate.keep)
        kept = sum(len(ids) for ids in candidate.keep.values())
        values = {"size_bytes": size_model.file_bytes(candidate.keep), "ram_bytes": size_model.ram_bytes(candidate.keep, budgets),
                  "drop_effective": round(1 - kept / total_experts, 6), "kept_experts": kept,
                  "proxy": proxy[settings.proxy], "kl": proxy["kl"], "nll": proxy["nll"],
                  "chrf++": quality["chrf++"], "bleu": quality["bleu"], "error_rate": quality["error_rate"],
                  "loss": round(parent_chrf - quality["chrf++"], 2), "directions": quality["directions"]}
        values["broken"] = meets(values, budgets, parent_chrf)
        candidate.values = values
        return candidate.row()

    bar = _ProgressBar(progress, len(candidates))
    rows = []
    with bar:
        for candidate in candidates:
            rows.append(score(candidate))
            bar.advance(candidate.name)
        correlation = rank_correlation(rows, settings.proxy)
        chosen = choose(rows, budgets)
        refinement, refined = {"ran": False}, None
        if chosen is not None and not uniform_only and settings.refine_steps > 0:
            start = next(c for c in candidates if c.name == chosen["name"])
            bar.extend(settings.refine_steps * len(moe_layers) * (len(moe_layers) - 1) + 1, "refine")
            refined, trace = refine(start, stats, settings, evaluator, n_experts, top_k, advance=lambda: bar.advance("refine"))
            refinement = {"ran": True, "from": start.name, "trace": trace}
            if canonical_keep(refined.keep) != canonical_keep(start.keep):
                row = score(refined)
                rows.append(row)
                bar.advance("refine")
                better = not row["broken"] and row["chrf++"] >= chosen["chrf++"]
                refinement.update(refined=row["name"], chrf_before=chosen["chrf++"], chrf_after=row["chrf++"],
                                  proxy_before=chosen["proxy"], proxy_after=row["proxy"], accepted=better)
                if better:
                    chosen = row
            else:
                refinement.update(accepted=False, note="no move improved the proxy")
    frontier = [{k: r[k] for k in ("name", "size_bytes", "chrf++", "error_rate", "proxy", "drop_effective", "counts")}
                for r in pareto_frontier(rows)]
    parent = {"fingerprint": evaluator.fingerprint, "chrf++": parent_chrf, "bleu": parent_quality["bleu"],
              "error_rate": parent_quality["error_rate"], "directions": parent_quality["directions"],
              "size_bytes": size_model.file_bytes({i: list(range(n_experts)) for i in moe_layers})}
    plan = None
    if chosen is not None:
        source = next(c for c in candidates + ([refined] if refinement.get("refined") else []) if c.name == chosen["name"])
        plan = chosen_plan(chosen, source, evaluator.fingerprint, budgets, settings, parent_chrf, stats, provenance)
    return SearchResult(chosen, plan, rows, frontier, correlation, parent, budgets, size_model, refinement, skipped,
                        {"computed": evaluator.computed, "reused": evaluator.reused})


def rank_correlation(rows: list[dict], proxy: str) -> dict:
    """Spearman's rho of -proxy (and -KL, -NLL) with dev chrF++ over the grid rows, overall and per drop ratio."""
    chrf = [r["chrf++"] for r in rows]
    correlation = {
        "proxy": proxy, "n": len(rows),
        "spearman_proxy_vs_chrf": spearman([-r["proxy"] for r in rows], chrf),
        "spearman_kl_vs_chrf": spearman([-r["kl"] for r in rows], chrf),
        "spearman_nll_vs_chrf": spearman([-r["nll"] for r in rows], chrf),
        "note": "Spearman rank correlation over the grid candidates of -proxy with dev chrF++ (+1: same order); "
                "within_drop: the same among the candidates of one drop ratio (plans of one size)",
        "within_drop": {},
    }
    for drop in sorted({r["drop"] for r in rows}):
        same = [r for r in rows if r["drop"] == drop]
        correlation["within_drop"][f"{drop:g}"] = {
            "n": len(same), "spearman": spearman([-r["proxy"] for r in same], [r["chrf++"] for r in same])}
    return correlation


def chosen_plan(chosen: dict, source: Candidate, fingerprint: str, budgets: Budgets, settings: SearchSettings,
                parent_chrf: float, stats, provenance: dict | None):
    """The plan file of the chosen row, its search summary in meta."""
    from packager.core.plan_file import Plan

    meta = dict(source.meta)
    meta.update(search={"name": chosen["name"], "size_format": budgets.size_format, "size_bytes": chosen["size_bytes"],
                        "ram_bytes": chosen["ram_bytes"], "dev_chrf++": chosen["chrf++"], "dev_error_rate": chosen["error_rate"],
                        "parent_dev_chrf++": parent_chrf, "proxy": {settings.proxy: chosen["proxy"]},
                        "budgets": asdict(budgets)},
                drop_ratio_effective=chosen["drop_effective"], kept_experts=chosen["kept_experts"],
                uniform_counts=len(set(chosen["counts"])) == 1)
    meta["stats_provenance"] = stats.meta.get("provenance", [])
    if provenance:
        meta["provenance"] = provenance
    return Plan(model_fingerprint=fingerprint, keep={int(k): v for k, v in chosen["keep"].items()}, meta=meta)


def write_outputs(result: SearchResult, out_plan: Path | None, out_json: Path, plot: Path | None) -> None:
    from runtime.atomic import atomic_write_json

    atomic_write_json(out_json, result.to_json())
    if plot is not None:
        plot_frontier(result, plot)
    if result.plan is not None and out_plan is not None:
        result.plan.save(out_plan)


def plot_frontier(result: SearchResult, path: Path) -> None:
    """Size vs dev chrF++ (every candidate grey, the frontier in blue, error rates annotated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from packager.figures import save_png

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    rows = [r for r in result.rows if r.get("chrf++") is not None]
    ax.scatter([r["size_bytes"] / 1e6 for r in rows], [r["chrf++"] for r in rows], s=14, color="#bbbbbb", label="candidates")
    front = result.frontier
    ax.plot([r["size_bytes"] / 1e6 for r in front], [r["chrf++"] for r in front], "-o", color="#1f77b4", ms=4, label="frontier")
    for r in front:
        ax.annotate(f"{r['error_rate']:.0%}", (r["size_bytes"] / 1e6, r["chrf++"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points", color="#555555")
    ax.axhline(result.parent["chrf++"], color="#2ca02c", ls="--", lw=1, label=f"parent {result.parent['chrf++']:.1f}")
    if result.chosen:
        ax.scatter([result.chosen["size_bytes"] / 1e6], [result.chosen["chrf++"]], s=60, facecolors="none",
                   edgecolors="#d62728", label="chosen")
    if result.budgets.max_file_bytes:
        ax.axvline(result.budgets.max_file_bytes / 1e6, color="#d62728", ls=":", lw=1, label="size budget")
    ax.set_xlabel(f"model file, MB ({result.budgets.size_format})")
    ax.set_ylabel("dev chrF++ (mask mode)")
    ax.set_title("plan search: size vs dev chrF++ (labels: generation-error rate)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


class _ProgressBar:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("plan search {task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
            self.task = self.bar.add_task("", total=self.total)
            self.bar.start()
        return self

    def advance(self, label: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=label)

    def extend(self, more: int, label: str) -> None:
        if self.bar is not None:
            self.total += more
            self.bar.update(self.task, total=self.total, description=label)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
