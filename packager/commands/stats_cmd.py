"""`packager stats merge A B ... --out C` (exact) and `packager stats show STATS`."""
from __future__ import annotations

from pathlib import Path

import click


@click.group("stats")
def stats_group() -> None:
    """Routing statistics files written by `packager calibrate`."""


@stats_group.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def merge_command(inputs: tuple[Path, ...], out_path: Path, force: bool) -> None:
    """Add statistics of the same model computed on different data (shards, machines)."""
    from packager.core.errors import OutputExistsError
    from packager.core.fingerprint import file_sha256
    from packager.core.stats import RoutingStats, merge_stats

    if out_path.exists() and not force:
        raise OutputExistsError(f"{out_path}: already exists: pass --force to overwrite it or choose another --out")
    parts = [RoutingStats.load(path) for path in inputs]
    merged = merge_stats(parts)
    merged.meta["merged_from"] = [{"path": str(path), "sha256": file_sha256(path)} for path in inputs]
    merged.save(out_path)
    click.echo(f"merged {len(parts)} files into {out_path} (pairs: {', '.join(merged.pairs())})")


@stats_group.command("show")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def show_command(path: Path) -> None:
    """Model, settings and token counts of a statistics file."""
    from packager.core.stats import SEQUENCE, RoutingStats

    stats = RoutingStats.load(path)
    meta = stats.meta
    click.echo(f"{path}: {meta['family']} model {meta['model_fingerprint'][:16]}..., {len(meta['moe_layers'])} MoE layers "
               f"x {meta['n_experts']} experts, top-{meta['top_k']}; mode {meta['mode']}; REAP {'yes' if stats.has_reap else 'no'}")
    click.echo(f"prompt template {meta.get('prompt_template')!r}; {len(meta.get('provenance', []))} calibration run(s)")
    for pair in stats.pairs():
        spans = stats.spans(pair)
        parts = [f"{span} {int(stats.get('tokens', pair, span)[0, 0])}" for span in spans]
        click.echo(f"  {pair}: {int(stats.get('sequences', pair, SEQUENCE)[0, 0])} sequences; tokens: {', '.join(parts)}")
