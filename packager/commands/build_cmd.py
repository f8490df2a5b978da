"""`packager build PACKS.toml --out RUN_DIR [--ray [ADDRESS]]`."""
from __future__ import annotations

import shlex
import sys

import click


@click.command("build")
@click.argument("packs_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=str), help="run directory")
@click.option("--dry-run", is_flag=True, help="list the steps and which are up to date; run nothing")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="run the steps as Ray tasks: alone, on a Ray instance started here; with ADDRESS, on that cluster "
                   "(the run directory, parent, data and packs file on a filesystem every node sees at the same paths)")
def build_command(packs_file, run_dir, dry_run, ray_address):
    """The whole chain for every pack x drop ratio x format x quantization in PACKS_FILE:
    calibrate, plan, prune, export, verify, bundle, report. Finished steps are skipped, so an
    interrupted build resumes where it stopped."""
    from packager.build import build

    record = build(packs_file, run_dir, dry_run=dry_run, command=shlex.join(sys.argv), ray=ray_address)
    if not dry_run:
        click.echo(f"report: {record['report']}")
