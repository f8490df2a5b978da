"""`packager bundle EXPORT_DIR_OR_FILE --metrics METRICS.json --out BUNDLE [--archive]`."""
from __future__ import annotations

import click


@click.command("bundle")
@click.argument("export", type=click.Path(path_type=str))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="metrics JSON written by `packager verify` for this export")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="bundle directory to create")
@click.option("--directions", default=None, multiple=True,
              help="directions the bundle offers (default: every verified one), e.g. en->de,fr")
@click.option("--calibration-data", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=str),
              help="calibration JSONL used for the plan: its licenses go into the manifest (repeatable)")
@click.option("--archive", is_flag=True, help="also write BUNDLE.tar (one file to copy)")
@click.option("--force", is_flag=True, help="replace an existing bundle")
def bundle_command(export, metrics_path, out, directions, calibration_data, archive, force):
    """Package an exported model, its tokenizer when needed and a manifest (metrics, licenses,
    sha256 of every file) into a directory that `edge-translate` runs offline."""
    from packager.bundle import make_bundle
    from runtime.bundle import ARCHIVE_SUFFIX

    path = make_bundle(export, metrics_path, out, directions=list(directions) or None,
                       calibration_data=calibration_data, archive=archive, force=force, progress=True)
    click.echo(f"bundle written to {path}")
    if archive:
        click.echo(f"archive written to {path.with_name(path.name + ARCHIVE_SUFFIX)}")
