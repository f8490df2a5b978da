"""`edge-translate MODEL_OR_BUNDLE [TEXT] --from en --to de`: translate offline.

Text comes from the TEXT argument, else from --file, else from stdin, and is translated line by
line: output line N is the translation of input line N (empty lines stay empty, CRLF stays
CRLF). `--jsonl IN:OUT` reads JSON objects and adds field OUT with the translation of field IN;
`--po in.po --out out.po` fills a gettext catalog. Input is UTF-8: an invalid byte stops the run
before anything is translated with one error line naming the line and byte offset, unless
`--encoding-errors replace`. Problems with one line (too long to cut, a backend error, a bad JSON
record) are warned about on stderr with the line number, and the rest goes on.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from runtime.errors import EdgeError
from runtime.languages import parse_language

logger = logging.getLogger(__name__)

LINES_PER_CALL = 16  # lines translated together (batched); output is written after each group


class InputError(EdgeError):
    """Input text that cannot be read."""


def decode_lines(data: bytes, source: str, errors: str) -> list[tuple[str, str]]:
    """(text, line ending) per line of UTF-8 `data`; InputError names the line and byte offset
    of the first invalid byte unless errors == "replace"."""
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"" and len(raw_lines) > 1:
        raw_lines.pop()
        endings = ["\n"] * len(raw_lines)
    else:
        endings = ["\n"] * (len(raw_lines) - 1) + [""]
    lines, offset = [], 0
    for number, (raw, ending) in enumerate(zip(raw_lines, endings), 1):
        body = raw[:-1] if raw.endswith(b"\r") and ending else raw
        try:
            text = body.decode("utf-8", errors="strict" if errors == "strict" else "replace")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{source}: line {number}, byte offset {exc.start} in the line ({offset + exc.start} in the input): "
                f"invalid UTF-8 (byte 0x{body[exc.start]:02x}); convert the text to UTF-8 or pass --encoding-errors replace"
            ) from None
        lines.append((text, ("\r" if body is not raw else "") + ending))
        offset += len(raw) + 1
    return lines


def _read_input(text: str | None, file: str | None) -> tuple[bytes, str]:
    if text is not None:
        return os.fsencode(text), "TEXT"
    if file is not None and file != "-":
        try:
            return Path(file).read_bytes(), file
        except OSError as exc:
            raise InputError(f"{file}: cannot read ({exc.strerror or exc})") from None
    return sys.stdin.buffer.read(), "<stdin>"


def _jsonl_fields(spec: str) -> tuple[str, str]:
    field_in, sep, field_out = spec.partition(":")
    if not sep or not field_in or not field_out:
        raise InputError(f"--jsonl {spec!r}: expected IN:OUT, the field to translate and the field to write (e.g. src:mt)")
    return field_in, field_out


class _Output:
    """stdout (bytes, UTF-8) or a file written atomically at the end."""

    def __init__(self, path: str | None):
        self.path = path
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        if self.path is None:
            sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
            sys.stdout.buffer.flush()
        else:
            self.parts.append(text)

    def close(self) -> None:
        if self.path is not None:
            from runtime.atomic import atomic_write_text

            atomic_write_text(self.path, "".join(self.parts))


def _translate_lines(translator, lines, src, tgt, output: _Output, jsonl: tuple[str, str] | None, warn) -> None:
    for start in range(0, len(lines), LINES_PER_CALL):
        group = lines[start:start + LINES_PER_CALL]
        texts, records = [], []
        for offset, (line, _) in enumerate(group):
            record = None
            if jsonl is not None and line.strip():
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get(jsonl[0]), str):
                        raise ValueError(f"no string field {jsonl[0]!r}")
                except ValueError as exc:
                    warn(start + offset, f"not a JSON object with a string field {jsonl[0]!r} ({exc}); copied unchanged")
                    record = None
                texts.append(record[jsonl[0]] if record is not None else "")
            else:
                texts.append(line if jsonl is None else "")
            records.append(record)
        translator.core.on_warning = lambda idx, msg, base=start: warn(base + idx, msg)
        outputs = translator.core.translate_texts(texts, src, tgt)
        for (line, ending), record, translated in zip(group, records, outputs):
            if jsonl is not None:
                if record is not None:
                    record[jsonl[1]] = translated
                    line = json.dumps(record, ensure_ascii=False)
                translated = line
            output.write(translated + ending)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=str))
@click.argument("text", required=False)
@click.option("--from", "src", required=True, help="source language, e.g. en")
@click.option("--to", "tgt", required=True, help="target language, e.g. de")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=str), help="translate this file line by line")
@click.option("--jsonl", "jsonl", metavar="IN:OUT", help="input lines are JSON objects: translate field IN into field OUT")
@click.option("--po", "po", type=click.Path(dir_okay=False, path_type=str), help="fill the empty msgstr of this gettext catalog")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=str),
              help="write here (atomically) instead of stdout; with --po: the output catalog (default: in place)")
@click.option("--overwrite", is_flag=True, help="with --po: also replace existing translations")
@click.option("--encoding-errors", type=click.Choice(["strict", "replace"]), default="strict", show_default=True,
              help="invalid UTF-8 in the input: stop with an error, or replace the bad bytes with U+FFFD")
@click.option("--no-protect", is_flag=True, help="do not protect placeholders and markup (%s, {0}, <b>, &amp;, &File)")
@click.option("--segment-chars", type=click.IntRange(min=20), default=400, show_default=True,
              help="cut lines longer than this into sentences (lines longer than the context always are)")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="pieces decoded together (both backends batch them)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy")
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed")
@click.option("--timings", is_flag=True, help="print load time, tokens/s and piece counts to stderr at the end")
@click.option("-v", "--verbose", count=True, help="more log output (repeat for debug)")
def main(model, text, src, tgt, file, jsonl, po, out, overwrite, encoding_errors, no_protect, segment_chars, batch_size,
         threads, max_new_tokens, temperature, seed, timings, verbose) -> None:
    """Translate TEXT (or --file, or stdin, or a --po catalog) with MODEL_OR_BUNDLE, offline.

    A bundle (directory or .tar from `packager bundle`) is verified against its manifest
    (sha256 of every file) and must cover the direction --from/--to."""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    try:
        _run(model, text, src, tgt, file, jsonl, po, out, overwrite, encoding_errors, no_protect, segment_chars,
             batch_size, threads, max_new_tokens, temperature, seed, timings)
    except EdgeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001 - never a traceback for the user; -vv shows it
        logger.debug("unexpected error", exc_info=True)
        click.echo(f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (run with -vv for details)", err=True)
        sys.exit(1)


def _run(model, text, src, tgt, file, jsonl, po, out, overwrite, encoding_errors, no_protect, segment_chars, batch_size,
         threads, max_new_tokens, temperature, seed, timings) -> None:
    from runtime.backends import Sampling
    from runtime.translator import Translator

    source, target = parse_language(src), parse_language(tgt)
    sampling = Sampling(temperature=temperature, seed=seed)
    if po is not None and (text is not None or file is not None or jsonl is not None):
        raise InputError("--po translates a catalog: give no TEXT, --file or --jsonl with it")
    if overwrite and po is None:
        raise InputError("--overwrite applies to --po only")
    fields = _jsonl_fields(jsonl) if jsonl is not None else None
    lines = None
    if po is None:  # read and check the whole input before loading the model
        data, name = _read_input(text, file)
        lines = decode_lines(data, name, encoding_errors) if data else []
        if text is not None and not lines:
            lines = [("", "")]
        if text is not None and lines and not lines[-1][1]:
            lines[-1] = (lines[-1][0], "\n")
    elif not Path(po).is_file():
        raise InputError(f"{po}: .po file not found")

    def warn(index: int, message: str) -> None:
        click.echo(f"warning: line {index + 1}: {message}", err=True)

    with Translator(model, threads, src=source.code, tgt=target.code, protect=not no_protect, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, segment_chars=segment_chars, sampling=sampling) as translator:
        if po is not None:
            translator.core.on_warning = lambda idx, msg: click.echo(f"warning: {po}: message {idx + 1}: {msg}", err=True)
            counts = translator.translate_po(po, out if out is not None else po, overwrite=overwrite)
            click.echo(f"{out or po}: {counts['translated']} entries translated (marked fuzzy, {counts['plural']} with plural "
                       f"forms), {counts['kept']} kept, {counts['obsolete']} obsolete kept", err=True)
        else:
            output = _Output(out)
            _translate_lines(translator, lines, source, target, output, fields, warn)
            output.close()
        if timings:
            t, s = translator.backend.timings, translator.stats
            click.echo(
                f"load {t.load_seconds:.2f} s, prefill {t.prefill_tokens_per_second:.1f} tok/s, "
                f"decode {t.decode_tokens_per_second:.1f} tok/s; {s.pieces} pieces, "
                f"{s.sentinel_retries} placeholder retries, {s.sentinel_fallbacks} placeholder fallbacks, "
                f"{s.passed_through + s.failed} copied untranslated",
                err=True,
            )


if __name__ == "__main__":
    main()
