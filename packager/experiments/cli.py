"""`python -m packager.experiments` (`make experiments`): the command line of the run."""
from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import click

from packager.experiments.config import QUICK, ExperimentConfig

PATH = click.Path(path_type=Path)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=PATH, default=Path("runs/experiments"), show_default=True)
@click.option("--model", type=PATH, default=Path("models/default"), show_default=True)
@click.option("--data", type=PATH, default=Path("data/harvest"), show_default=True)
@click.option("--results-md", type=PATH, default=None,
              help="Markdown page to write (default docs/results.md; with --quick or --only OUT/results.md)")
@click.option("--quick", is_flag=True, help="tiny grid and samples: checks the pipeline in a minute")
@click.option("--only", type=click.Choice(("reduce",)), default=None,
              help="run one stage alone: reduce = merge vs drop and top-k reduction (writes OUT/reduce.json)")
@click.option("--split", type=click.Choice(("test", "dev")), default=None,
              help="split the cells are scored on [default: test]; with dev, calibration reads the train split")
@click.option("--sample", type=int, default=None, help="sentences per direction")
@click.option("--distill-minutes", type=float, default=None)
@click.option("--distill-sentences", type=int, default=None)
@click.option("--threads", type=int, default=None)
@click.option("-v", "--verbose", is_flag=True)
def experiments_command(out: Path, model: Path, data: Path, results_md: Path | None, quick: bool, only: str | None,
                        split: str | None, sample: int | None, distill_minutes: float | None,
                        distill_sentences: int | None, threads: int | None, verbose: bool) -> None:
    """`make experiments`: the method's findings reproduced on the embedded default model."""
    from packager.experiments.runner import Experiment

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = QUICK if quick else ExperimentConfig()
    overrides = {k: v for k, v in (("sample", sample), ("distill_minutes", distill_minutes), ("split", split),
                                   ("distill_sentences", distill_sentences), ("threads", threads)) if v is not None}
    config = replace(config, **overrides)
    page = results_md or (out / "results.md" if quick or only else Path("docs/results.md"))
    experiment = Experiment(model, data, out, config, page, command=shlex.join(sys.argv))
    if only == "reduce":
        results = experiment.run_reduce()
        click.echo(f"results: {out / 'reduce.json'}, page: {page} ({results['timings_seconds']['total'] / 60:.1f} min)",
                   err=True)
        return
    results = experiment.run()
    click.echo(f"results: {out / 'results.json'}, page: {page} ({results['timings_seconds']['total'] / 60:.1f} min)",
               err=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; a PackagerError is one `error:` line and exit status 1."""
    from packager.core.errors import PackagerError

    try:
        experiments_command.main(args=argv, prog_name="python -m packager.experiments", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except PackagerError as exc:
        click.echo("error: " + " ".join(str(exc).split()), err=True)
        return 1
    return 0
