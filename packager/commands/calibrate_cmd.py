"""`packager calibrate MODEL --data FILE --pairs en-de,de-en --out STATS.safetensors`.

MODEL is a Hugging Face directory (transformers, packager.calibrate) or a `.gguf` file
(llama.cpp, packager.calibrate_gguf: needs neither torch nor transformers)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


@click.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="JSONL (harvest records), TSV (header: the two languages) or plain text; repeatable")
@click.option("--pairs", required=True, help="directions to calibrate: 'en-de,de-en', 'en<->de,fr'")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="statistics file to write (safetensors)")
@click.option("--teacher-forced", is_flag=True, help="use the reference translations instead of generating (faster)")
@click.option("--max-sentences", default=200, show_default=True, type=int, help="per direction; 0 = all")
@click.option("--max-new-tokens", default=128, show_default=True, type=int, help="bound of each generated translation")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--prompt-template", default="{source}", show_default=True,
              help="user message: {source} plus optional {source_lang} {target_lang} {source_name} {target_name}")
@click.option("--reap/--no-reap", default=True, show_default=True, help="also record REAP sums (expert output norms)")
@click.option("--seed", default=0, show_default=True, type=int, help="sentence sampling seed")
@click.option("--text-lang", default=None, help="language of plain-text data files")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="transformers compute dtype (a GGUF runs in its own tensor types)")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (a GPU when torch sees one)")
@click.option("--execution", type=click.Choice(["auto", "whole", "streamed"]), default="auto", show_default=True,
              help="whole model in memory, or streamed one decoder layer at a time from the checkpoint; "
                   "auto picks by weight size against free memory")
@click.option("--max-activation-mb", type=int, default=None,
              help="streamed: hidden states above this many MB spill to disk (default: what free RAM allows)")
@click.option("--spill-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="streamed: directory for the hidden-state spill file (default: the system temp dir)")
@click.option("--expert-group-mb", type=int, default=None,
              help="streamed: routed experts are read in groups of about this many MB [default: 256]")
@click.option("--generator", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="a GGUF of the parent that produces the greedy translations (needed to generate when streaming)")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="cache of the parent's translations [default: calibration-cache beside --out]")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def calibrate_command(model: Path, data: tuple[Path, ...], pairs: str, out_path: Path, teacher_forced: bool,
                      max_sentences: int, max_new_tokens: int, batch_size: int, prompt_template: str, reap: bool,
                      seed: int, text_lang: str | None, dtype: str, device: str, execution: str,
                      max_activation_mb: int | None, spill_dir: Path | None, expert_group_mb: int | None,
                      generator: Path | None,
                      cache_dir: Path | None, force: bool) -> None:
    """Record the routing statistics of MODEL (a Hugging Face directory or a .gguf file) on
    translation prompts."""
    from packager.calibration_data import CalibrationError, CalibrationSettings, parse_pair_list
    from packager.core.errors import OutputExistsError

    if out_path.exists() and not force:
        raise OutputExistsError(f"{out_path}: already exists: pass --force to overwrite it or choose another --out")
    if not out_path.parent.is_dir():
        raise CalibrationError(f"{out_path}: directory {out_path.parent} does not exist: create it first")
    settings = CalibrationSettings(
        pairs=tuple(parse_pair_list(pairs)), teacher_forced=teacher_forced,
        max_sentences=None if max_sentences == 0 else max_sentences, max_new_tokens=max_new_tokens,
        batch_size=batch_size, prompt_template=prompt_template, reap=reap, seed=seed, text_lang=text_lang, dtype=dtype,
        device=device, execution=execution, max_activation_mb=max_activation_mb,
        spill_dir=str(spill_dir) if spill_dir else None,
        expert_group_bytes=None if expert_group_mb is None else expert_group_mb * 1024**2, generator=str(generator) if generator else None,
        cache_dir=str(cache_dir or out_path.parent / "calibration-cache"),
    )
    if model.suffix.lower() == ".gguf":
        from packager.calibrate_gguf import calibrate_gguf

        stats = calibrate_gguf(model, list(data), settings, command=shlex.join(sys.argv), show_progress=True)
    else:
        from packager.calibrate import calibrate

        stats = calibrate(model, list(data), settings, command=shlex.join(sys.argv), show_progress=True)
    stats.save(out_path)
    run = stats.meta["provenance"][0]
    counts = ", ".join(f"{slug} {n} sentences / {run['tokens'][slug]} tokens" for slug, n in run["sentences"].items())
    how = run["execution"]["mode"] + (f" on {run['execution']['device']}" if run["execution"]["device"] != "cpu" else "")
    click.echo(f"statistics written to {out_path} ({settings.mode}, {how}; {counts}; {run['seconds']:.1f} s)")
