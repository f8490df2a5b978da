"""`packager prune MODEL --plan PLAN.json --out DIR [--top-k K | K1,K2,...]`; `--top-k` alone (no plan)
writes a top-k reduction of MODEL itself."""
from __future__ import annotations

import click

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


class ByteSize(click.ParamType):
    """`2GB`, `500MiB`, `1000000` -> bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper()
        number = text.rstrip("KMGIB")
        unit = text[len(number):]
        try:
            nbytes = int(float(number) * _UNITS[unit])
        except (KeyError, ValueError):
            self.fail(f"{value!r} is not a size like 2GB or 500MiB", param, ctx)
        if nbytes < 1:
            self.fail("size must be positive", param, ctx)
        return nbytes


@click.command("prune")
@click.argument("model", type=click.Path(file_okay=False, path_type=str))
@click.option("--plan", "plan_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="plan JSON: kept expert ids per MoE layer (may be left out with --top-k: reduce k only)")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="output checkpoint directory")
@click.option("--force", is_flag=True, help="replace the output directory if it exists")
@click.option("--max-shard-size", "max_shard_bytes", type=ByteSize(), default="2GiB", show_default=True,
              help="largest output shard")
@click.option("--hash-inputs/--hash-headers", "hash_inputs", default=None,
              help="provenance: full sha256 of input shards, or of their headers (default: full up to 2 GiB)")
@click.option("--dry-run", is_flag=True, help="validate the plan and print what would be written; write nothing")
@click.option("--reduce", type=click.Choice(("drop", "merge")), default="drop", show_default=True,
              help="drop the experts the plan leaves out, or merge each into its most similar kept expert")
@click.option("--stats", "stats_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="--reduce merge: routing statistics (routing-mass merge weights)")
@click.option("--calib", "calib", multiple=True, type=click.Path(dir_okay=False, path_type=str),
              help="--reduce merge: JSONL records whose tokens pick each dropped expert's partner; repeatable")
@click.option("--merge-map", "merge_map_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="--reduce merge: JSON {layer: [[dropped, kept], ...]} instead of choosing partners")
@click.option("--merge-align", "merge_align", default="none", show_default=True, metavar="none|activations|weights",
              help="--reduce merge: line each dropped expert's neurons up with its partner's before averaging, "
                   "matched on calibration activations (needs --calib) or on weights; none averages as stored")
@click.option("--top-k", "top_k_text", default=None, metavar="K|K1,K2,...",
              help="also serve the output with fewer experts per token: one k for every MoE layer, or one per "
                   "MoE layer in order (per-layer k: ONNX only; packager.topk)")
def prune_command(model: str, plan_path: str | None, out_dir: str, force: bool, max_shard_bytes: int,
                  hash_inputs: bool | None, dry_run: bool, reduce: str, stats_path: str | None, calib: tuple[str, ...],
                  merge_map_path: str | None, merge_align: str, top_k_text: str | None) -> None:
    """Write a copy of MODEL that keeps only the experts listed in the plan (and/or serves it at a lower top-k)."""
    from packager.core.plan_file import Plan
    from packager.merge import MergeError, check_align
    from packager.prune import describe_prune, prune_checkpoint

    # checked before any work (and before --top-k stages a prune)
    check_align(merge_align)
    if merge_align != "none" and reduce != "merge":
        raise MergeError(f"--merge-align {merge_align} aligns experts before merging: it needs --reduce merge")

    if top_k_text is not None:
        _top_k_command(model, plan_path, out_dir, force, dry_run, reduce, stats_path, calib, merge_map_path, merge_align,
                       top_k_text, max_shard_bytes, hash_inputs)
        return
    if plan_path is None:
        raise click.UsageError("give --plan PLAN.json (which experts to keep), or --top-k alone to lower top-k only")

    if reduce == "merge" and not dry_run:
        import json
        from pathlib import Path

        from packager.merge import merge_prune
        from packager.core.stats import RoutingStats

        if stats_path is None:
            raise MergeError("--reduce merge needs --stats (merge weights are the pack's routing mass)")
        merge_map = None
        if merge_map_path is not None:
            try:
                merge_map = json.loads(Path(merge_map_path).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise MergeError(f"{merge_map_path}: not a readable JSON merge map ({exc})") from None
        out = merge_prune(model, Plan.load(plan_path), out_dir, stats=RoutingStats.load(stats_path),
                          calib=[Path(c) for c in calib], merge_map=merge_map, align=merge_align, force=force,
                          progress=True)
        aligned = "" if merge_align == "none" else f", neurons aligned on {merge_align}"
        click.echo(f"merged and pruned checkpoint written to {out} (merge map{aligned} in pruning.json)")
        return

    if dry_run:
        summary = describe_prune(model, Plan.load(plan_path))
        for layer_idx, (before, after) in summary["experts_per_layer"].items():
            click.echo(f"layer {layer_idx}: {before} -> {after} experts")
        ratio = summary["output_tensor_bytes"] / summary["input_tensor_bytes"]
        click.echo(f"{summary['family']}: {summary['input_tensor_bytes']:,} -> {summary['output_tensor_bytes']:,} tensor bytes "
                   f"({ratio:.1%}); {'uniform' if summary['uniform'] else 'non-uniform (load with packager.load_pruned; not loadable by stock llama.cpp)'}")
        return

    out = prune_checkpoint(model, Plan.load(plan_path), out_dir, force=force, max_shard_bytes=max_shard_bytes,
                           hash_inputs=hash_inputs, progress=True)
    click.echo(f"pruned checkpoint written to {out}")


def _top_k_command(model, plan_path, out_dir, force, dry_run, reduce, stats_path, calib, merge_map_path, merge_align,
                   top_k_text, max_shard_bytes, hash_inputs) -> None:
    """--top-k: check the k against MODEL first, then prune (with a plan) into a staging directory and reduce."""
    import shutil
    from pathlib import Path

    from packager.core.errors import OutputExistsError
    from packager.topk import check_top_k, parse_top_k, reduce_top_k

    top_k = parse_top_k(top_k_text)
    ks = check_top_k(model, top_k)  # before any pruning: a bad k leaves nothing behind
    if plan_path is None and (reduce != "drop" or stats_path or calib or merge_map_path):
        raise click.UsageError("--reduce merge, --stats, --calib and --merge-map need --plan")
    final = Path(out_dir)
    if dry_run:
        if plan_path is not None:
            ctx = click.get_current_context()
            ctx.invoke(prune_command, model=model, plan_path=plan_path, out_dir=out_dir, force=force, dry_run=True,
                       max_shard_bytes=max_shard_bytes, hash_inputs=hash_inputs, reduce=reduce, stats_path=stats_path,
                       calib=calib, merge_map_path=merge_map_path, merge_align=merge_align, top_k_text=None)
        click.echo(f"top-k per MoE layer: {','.join(map(str, ks))}")
        return
    if final.exists() and not force:
        raise OutputExistsError(f"{final}: output path exists; choose another path or pass --force")
    if plan_path is None:
        reduce_top_k(model, final, top_k, force=force)
    else:
        staged = final.with_name(f".{final.name}.before-top-k")
        ctx = click.get_current_context()
        try:
            ctx.invoke(prune_command, model=model, plan_path=plan_path, out_dir=str(staged), force=True,
                       max_shard_bytes=max_shard_bytes, hash_inputs=hash_inputs, dry_run=False, reduce=reduce,
                       stats_path=stats_path, calib=calib, merge_map_path=merge_map_path, merge_align=merge_align,
                       top_k_text=None)
            reduce_top_k(staged, final, top_k, force=force)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    click.echo(f"{final}: served with top-k {','.join(map(str, ks))} per MoE layer (reduction.json)")
