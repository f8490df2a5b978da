"""`packager plan create | compare | show`: expert masks from routing statistics."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from packager.planning import ALLOCATIONS, DIRECTIONS, RANKERS
from packager.core.stats import SPANS


@click.group("plan")
def plan_group() -> None:
    """Decide which experts each MoE layer keeps."""


@plan_group.command("create")
@click.argument("stats_path", metavar="STATS", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--langs", required=True, help="the pack's languages besides English, e.g. 'de,fr'")
@click.option("--direction", type=click.Choice(DIRECTIONS), default="en-x", show_default=True)
@click.option("--drop", "drop_ratio", type=float, required=True, help="share of routed experts to drop, in (0, 1)")
@click.option("--ranker", type=click.Choice(RANKERS), default="routing-mass", show_default=True)
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default=None,
              help="per-layer counts [default: dynamic, or uniform with --uniform]")
@click.option("--uniform", is_flag=True, help="one count for every layer: the only kind stock llama.cpp (GGUF) loads")
@click.option("--spans", default="sequence", show_default=True,
              help=f"comma-separated spans whose statistics rank the experts ({', '.join(SPANS)})")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the random ranker")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="check that STATS come from this model")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def create_command(stats_path: Path, langs: str, direction: str, drop_ratio: float, ranker: str,
                   allocation: str | None, uniform: bool, spans: str, seed: int, model_dir: Path | None,
                   out_path: Path, force: bool) -> None:
    """Write a plan (kept expert ids per MoE layer) for a language pack."""
    from packager import __version__
    from packager.core.errors import OutputExistsError
    from packager.core.fingerprint import file_sha256, model_fingerprint
    from packager.core.provenance import created_utc
    from packager.planning import PlanSettings, make_plan
    from packager.core.stats import RoutingStats, StatsError

    if out_path.exists() and not force:
        raise OutputExistsError(f"{out_path}: already exists: pass --force to overwrite it or choose another --out")
    stats = RoutingStats.load(stats_path)
    if model_dir is not None:
        fingerprint = model_fingerprint(model_dir)
        if fingerprint != stats.meta["model_fingerprint"]:
            raise StatsError(f"{stats_path}: statistics come from another model ({stats.meta['model_fingerprint'][:16]}...) "
                             f"than {model_dir} ({fingerprint[:16]}...): calibrate this model")
    settings = PlanSettings(
        langs=tuple(langs.split(",")), direction=direction, drop_ratio=drop_ratio, ranker=ranker,
        allocation=allocation or ("uniform" if uniform else "dynamic"), seed=seed,
        spans=tuple(s.strip() for s in spans.split(",")), uniform=uniform,
    )
    provenance = {"command": shlex.join(sys.argv), "stats": {"path": str(stats_path), "sha256": file_sha256(stats_path)},
                  "versions": {"packager": __version__}, **created_utc()}
    plan = make_plan(stats, settings, provenance)
    plan.save(out_path)
    counts = [len(plan.keep[layer_idx]) for layer_idx in sorted(plan.keep)]
    click.echo(f"plan written to {out_path}: keeps {sum(counts)} of {plan.meta['total_experts']} experts "
               f"(drop {plan.meta['drop_ratio_effective']:.4g}), per layer {counts}")
    if not plan.meta["uniform_counts"]:
        click.echo("note: per-layer counts differ; ONNX bundles handle this, stock llama.cpp (GGUF) does not: "
                   "use --uniform for a GGUF plan", err=True)


def _n_experts_of(plan, override: int | None) -> int:
    from packager.core.errors import PlanError

    n_experts = override or plan.meta.get("n_experts")
    if not isinstance(n_experts, int):
        raise PlanError(f"{plan.where}: meta has no 'n_experts' (plans from `packager plan create` do): pass --n-experts")
    return n_experts


@plan_group.command("compare")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--samples", default=4000, show_default=True, type=int, help="draws for the all-together random baseline")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--n-experts", default=None, type=int, help="experts per layer of the parent, if the plans do not say")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def compare_command(paths: tuple[Path, ...], samples: int, seed: int, n_experts: int | None, as_json: bool) -> None:
    """Global IoU of retained (layer, expert) pairs, next to random masks of the same sizes."""
    from packager.core.errors import PlanError
    from packager.core.plan_file import Plan
    from packager.planning import compare_keeps

    if len(paths) < 2:
        raise PlanError("plan compare needs at least two plan files")
    plans = [Plan.load(path) for path in paths]
    for plan in plans[1:]:
        if plan.model_fingerprint != plans[0].model_fingerprint:
            raise PlanError(f"{plan.where}: made for another model than {plans[0].where}: compare plans of the same model")
    counts = {_n_experts_of(plan, n_experts) for plan in plans}
    if len(counts) != 1:
        raise PlanError(f"plans disagree on the expert count per layer ({sorted(counts)}): compare plans of the same model")
    per_layer = counts.pop()
    names = [str(path) for path in paths]
    report = compare_keeps([plan.keep for plan in plans], names, {layer_idx: per_layer for layer_idx in plans[0].keep},
                           samples=samples, seed=seed)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"{'plan A':<30} {'plan B':<30} {'IoU':>7} {'random':>7}")
    for row in report.pairwise:
        click.echo(f"{row['a'][-30:]:<30} {row['b'][-30:]:<30} {row['iou']:7.3f} {row['random_iou']:7.3f}")
    click.echo(f"all {len(plans)} together: IoU {report.all_iou:.3f}, random {report.all_random_iou:.3f} ({report.all_random_method})")
    click.echo(f"pairwise random baseline: {report.pairwise_random_method}")


@plan_group.command("show")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--n-experts", default=None, type=int, help="experts per layer of the parent, if the plan does not say")
def show_command(path: Path, n_experts: int | None) -> None:
    """Per-layer kept counts with a small bar view."""
    from packager.core.plan_file import Plan

    plan = Plan.load(path)
    total = _n_experts_of(plan, n_experts)
    meta = plan.meta
    click.echo(f"{path}: model {plan.model_fingerprint[:16]}...; ranker {meta.get('ranker')}, allocation {meta.get('allocation')}, "
               f"drop {meta.get('drop_ratio')}; languages {','.join(meta.get('languages', []))} ({meta.get('direction')})")
    jsd = meta.get("jsd", {})
    for layer_idx in sorted(plan.keep):
        count = len(plan.keep[layer_idx])
        bar = "█" * count + "·" * max(total - count, 0)
        extra = f"  jsd {jsd[str(layer_idx)]:.4f}" if str(layer_idx) in jsd else ""
        click.echo(f"layer {layer_idx:>3}  {count:>4}/{total:<4} {bar}{extra}")
    kept = sum(len(ids) for ids in plan.keep.values())
    click.echo(f"kept {kept} of {total * len(plan.keep)} experts; "
               f"{'one count for every layer (GGUF-loadable)' if plan.is_uniform() else 'per-layer counts differ (ONNX only)'}")


@plan_group.command("search")
@click.argument("stats_path", metavar="STATS", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="the parent")
@click.option("--dev", "dev_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL dev records {src_lang, tgt_lang, src, tgt} (never the test split)")
@click.option("--langs", required=True, help="the pack's languages besides English, e.g. 'de,fr'")
@click.option("--direction", type=click.Choice(DIRECTIONS), default="en-x", show_default=True)
@click.option("--max-file-mb", "max_file", default=None, metavar="FORMAT:QUANT=MB",
              help="model file budget, e.g. gguf:Q8_0=10, onnx:int8=25, safetensors=60 (MB = 10^6 bytes)")
@click.option("--max-ram-mb", type=float, default=None, help="estimated runtime footprint budget (file + KV cache + overhead)")
@click.option("--ram-overhead-mb", type=float, default=0.0, show_default=True, help="runtime baseline added to the RAM estimate")
@click.option("--ctx", "ctx_tokens", type=int, default=512, show_default=True, help="context length of the RAM estimate's KV cache")
@click.option("--drop", "min_drop", type=float, default=None, help="drop at least this share of routed experts")
@click.option("--max-loss", type=float, default=None, help="at most this many dev chrF++ points below the parent")
@click.option("--size-format", default=None, help="format of the size axis without a file budget [default: safetensors]")
@click.option("--rankers", default=",".join(("routing-mass", "frequency", "reap")), show_default=True)
@click.option("--allocations", default=",".join(ALLOCATIONS), show_default=True)
@click.option("--drops", default="0.25,0.5,0.625,0.75,0.875", show_default=True, help="drop ratios of the grid")
@click.option("--dev-n", type=int, default=100, show_default=True, help="dev sentences per direction")
@click.option("--proxy", type=click.Choice(("kl", "nll")), default="kl", show_default=True)
@click.option("--refine-steps", type=int, default=8, show_default=True, help="slot moves of the refinement (0: none)")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--work", "work_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="cache directory (resumable) [default: OUT.search/]")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="the chosen plan")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def search_command(stats_path: Path, model_dir: Path, dev_path: Path, langs: str, direction: str, max_file: str | None,
                   max_ram_mb: float | None, ram_overhead_mb: float, ctx_tokens: int, min_drop: float | None,
                   max_loss: float | None, size_format: str | None, rankers: str, allocations: str, drops: str, dev_n: int,
                   proxy: str, refine_steps: int, threads: int, work_dir: Path | None, out_path: Path, force: bool) -> None:
    """The best plan under budgets: grid + refinement in mask mode on a dev split; writes the plan,
    OUT.frontier.json and OUT.frontier.png."""
    from packager import __version__
    from packager.core.errors import OutputExistsError
    from packager.core.fingerprint import file_sha256
    from packager.core.provenance import created_utc
    from packager.plan_search import Budgets, SearchError, SearchSettings, parse_size_budget, search, write_outputs
    from packager.core.stats import RoutingStats

    if out_path.exists() and not force:
        raise OutputExistsError(f"{out_path}: already exists: pass --force to overwrite it or choose another --out")
    fmt, max_bytes = parse_size_budget(max_file) if max_file else (size_format or "safetensors", None)
    if max_file and size_format and size_format != fmt:
        raise SearchError(f"--size-format {size_format} differs from the --max-file-mb format {fmt}: give one")
    budgets = Budgets(size_format=fmt, max_file_bytes=max_bytes,
                      max_ram_bytes=None if max_ram_mb is None else int(max_ram_mb * 1_000_000), min_drop=min_drop,
                      max_loss=max_loss, ram_overhead_bytes=int(ram_overhead_mb * 1_000_000), ctx_tokens=ctx_tokens)
    try:
        drop_list = tuple(float(d) for d in drops.split(",") if d.strip())
    except ValueError:
        raise SearchError(f"--drops {drops!r}: give comma-separated ratios such as 0.5,0.75") from None
    if min_drop is not None and min_drop not in drop_list:
        drop_list = tuple(sorted(drop_list + (min_drop,)))
    settings = SearchSettings(langs=tuple(langs.split(",")), direction=direction,
                              rankers=tuple(r.strip() for r in rankers.split(",") if r.strip()),
                              allocations=tuple(a.strip() for a in allocations.split(",") if a.strip()),
                              drops=drop_list, dev_n=dev_n, proxy=proxy, refine_steps=refine_steps, threads=threads)
    stats = RoutingStats.load(stats_path)
    work = work_dir or out_path.with_name(out_path.name + ".search")
    provenance = {"command": shlex.join(sys.argv), "stats": {"path": str(stats_path), "sha256": file_sha256(stats_path)},
                  "dev": {"path": str(dev_path), "sha256": file_sha256(dev_path)},
                  "versions": {"packager": __version__}, **created_utc()}
    result = search(stats, model_dir, dev_path, budgets, settings, work, progress=True, provenance=provenance)
    frontier_json = out_path.with_suffix(".frontier.json")
    write_outputs(result, out_path, frontier_json, out_path.with_suffix(".frontier.png"))
    corr = result.correlation["spearman_proxy_vs_chrf"]
    click.echo(f"{len(result.rows)} plans scored ({result.cells['computed']} computed, {result.cells['reused']} cached); "
               f"parent dev chrF++ {result.parent['chrf++']:.1f}; proxy {proxy} rank correlation with chrF++ "
               f"{'n/a' if corr is None else f'{corr:+.2f}'}")
    for point in result.frontier:
        click.echo(f"  frontier {point['size_bytes'] / 1e6:9.3f} MB  chrF++ {point['chrf++']:5.1f}  "
                   f"errors {point['error_rate']:.0%}  {point['name']}")
    if result.chosen is None:
        raise SearchError(f"no plan meets the budgets (frontier written to {frontier_json}): relax a budget")
    chosen = result.chosen
    click.echo(f"plan written to {out_path}: {chosen['name']}, {chosen['size_bytes'] / 1e6:.3f} MB ({fmt}), "
               f"dev chrF++ {chosen['chrf++']:.1f} (parent {result.parent['chrf++']:.1f}), errors {chosen['error_rate']:.0%}, "
               f"per layer {chosen['counts']}; frontier: {frontier_json}")
