"""`packager report RUN_DIRS... --out REPORT_DIR`."""
from __future__ import annotations

import sys

import click


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str), help="report directory")
def report_command(run_dirs, out_dir):
    """Size-vs-quality report over every `packager verify` metrics file under RUN_DIRS:
    index.html (plots and a table per language pack), report.json, report.csv, report.md."""
    from packager.report import build_report

    index = build_report(run_dirs, out_dir, command=" ".join(sys.argv))
    click.echo(f"report written to {index}")
