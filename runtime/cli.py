"""`edge-translate MODEL_OR_BUNDLE [TEXT] --from en --to de`: translate offline.

Text comes from the TEXT argument, else from --file, else from stdin; it is translated line
by line and each translation is streamed as it is generated. Empty lines stay empty.
"""
from __future__ import annotations

import logging
import sys
from typing import Iterable, TextIO

import click

from runtime.errors import EdgeError
from runtime.languages import parse_language

logger = logging.getLogger(__name__)


def _lines(text: str | None, file: TextIO | None) -> Iterable[str]:
    if text is not None:
        yield from text.splitlines() or [""]
        return
    for line in file if file is not None else sys.stdin:
        yield line.rstrip("\n").rstrip("\r")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=str))
@click.argument("text", required=False)
@click.option("--from", "src", required=True, help="source language, e.g. en")
@click.option("--to", "tgt", required=True, help="target language, e.g. de")
@click.option("--file", "file", type=click.File("r", encoding="utf-8"), help="translate this file line by line")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy")
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed")
@click.option("--timings", is_flag=True, help="print load time and tokens/s to stderr at the end")
@click.option("-v", "--verbose", count=True, help="more log output (repeat for debug)")
def main(model, text, src, tgt, file, threads, max_new_tokens, temperature, seed, timings, verbose) -> None:
    """Translate TEXT (or --file, or stdin) with MODEL_OR_BUNDLE, offline.

    A bundle (directory or .tar from `packager bundle`) is verified against its manifest
    (sha256 of every file) and must cover the direction --from/--to."""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    from runtime.backends import Sampling
    from runtime.bundle import open_translator

    try:
        source, target = parse_language(src), parse_language(tgt)
        sampling = Sampling(temperature=temperature, seed=seed)
        # a bundle is checked first: manifest digest, direction, sha256 of every file
        with open_translator(model, source, target, n_threads=threads) as backend:
            for line in _lines(text, file):
                if line.strip():
                    for piece in backend.translate_stream(line, source, target, max_new_tokens, sampling):
                        click.echo(piece, nl=False)
                click.echo("")
            if timings:
                t = backend.timings
                click.echo(
                    f"load {t.load_seconds:.2f} s, prefill {t.prefill_tokens_per_second:.1f} tok/s, "
                    f"decode {t.decode_tokens_per_second:.1f} tok/s",
                    err=True,
                )
    except EdgeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
