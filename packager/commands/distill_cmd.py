"""`packager distill PRUNED_DIR --parent PARENT_DIR --data FILE --pairs en-de --out DIR`."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


@click.command("distill")
@click.argument("pruned_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--parent", "parent_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="the unpruned parent checkpoint the model was pruned from")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL (harvest records), TSV (header: the two languages) or plain text; repeatable")
@click.option("--pairs", required=True, help="directions to train: 'en-de,en-fr', 'en->de,fr,es', 'en<->de'")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="output checkpoint directory")
@click.option("--targets", type=click.Choice(["parent", "references"]), default="parent", show_default=True,
              help="parent: sequence-level distillation on the parent's translations; references: SFT control")
@click.option("--sentences", default=2000, show_default=True, type=int,
              help="source sentences per direction (a small share is held out as the dev set)")
@click.option("--max-steps", type=int, default=None, help="optimizer steps (total across resumes)")
@click.option("--minutes", type=float, default=None, help="training wall time (total across resumes)")
@click.option("--lr", default=3e-4, show_default=True, type=float, help="peak AdamW learning rate")
@click.option("--batch-tokens", default=4096, show_default=True, type=int, help="padded tokens per batch")
@click.option("--eval-every", default=100, show_default=True, type=int, help="steps between dev-loss evaluations")
@click.option("--patience", default=3, show_default=True, type=int, help="evaluations without dev improvement before stopping")
@click.option("--seed", default=0, show_default=True, type=int, help="sampling, dev split, batch order and init seed")
@click.option("--max-new-tokens", default=128, show_default=True, type=int, help="bound of each parent translation")
@click.option("--beams", "num_beams", default=1, show_default=True, type=int, help="parent beam size (1 = greedy)")
@click.option("--keep-unfinished", is_flag=True, help="also train on parent outputs cut by --max-new-tokens")
@click.option("--keep-flagged", is_flag=True,
              help="also train on parent outputs the generation-error detectors flag (loops, wrong language, ...)")
@click.option("--gen-batch-size", default=32, show_default=True, type=int, help="parent translation batch size")
@click.option("--prompt-template", default="{source}", show_default=True, help="user message around {source}")
@click.option("--text-lang", default=None, help="language of plain-text data files (parent targets only)")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="parent-output cache (default: distill-cache/ beside --out)")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="resumable training state (default: .OUT.distill-work beside --out)")
@click.option("--keep-work", is_flag=True, help="keep the training state after success")
@click.option("--device", default="cpu", show_default=True, help="torch device for the parent and the training, e.g. cuda")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="weights of the parent and of the model in training (bfloat16 for large models on a GPU)")
@click.option("--force", is_flag=True, help="replace --out if it exists")
def distill_command(pruned_dir: Path, parent_dir: Path, data: tuple[Path, ...], pairs: str, out_dir: Path, targets: str,
                    sentences: int, max_steps: int | None, minutes: float | None, lr: float, batch_tokens: int,
                    eval_every: int, patience: int, seed: int, max_new_tokens: int, num_beams: int,
                    keep_unfinished: bool, keep_flagged: bool, gen_batch_size: int, prompt_template: str, text_lang: str | None,
                    cache_dir: Path | None, work_dir: Path | None, keep_work: bool, device: str, dtype: str,
                    force: bool) -> None:
    """Recover a pruned model by fine-tuning it on its parent's translations.

    Every parameter of PRUNED_DIR is trained (full fine-tune); the output is a pruned
    checkpoint that the export commands accept. For a 20-30B parent on a GPU see the
    notes at the top of packager/distill/__init__.py (--device cuda --dtype bfloat16 --lr 1e-5 ...)."""
    from packager.calibration_data import CalibrationError, parse_pair_list
    from packager.distill import DistillError, DistillSettings, distill

    try:
        slugs = tuple(parse_pair_list(pairs))
    except CalibrationError as exc:
        raise DistillError(str(exc)) from None
    settings = DistillSettings(
        pairs=slugs, targets=targets, sentences=sentences, max_steps=max_steps, minutes=minutes, lr=lr,
        batch_tokens=batch_tokens, eval_every=eval_every, patience=patience, seed=seed, max_new_tokens=max_new_tokens,
        num_beams=num_beams, keep_unfinished=keep_unfinished, drop_flagged=not keep_flagged,
        gen_batch_size=gen_batch_size,
        prompt_template=prompt_template, text_lang=text_lang, device=device, dtype=dtype,
    )
    result = distill(pruned_dir, parent_dir, list(data), settings, out_dir, cache_dir=cache_dir, work_dir=work_dir,
                     force=force, keep_work=keep_work, command=shlex.join(sys.argv), show_progress=True)
    run = result.provenance["run"]
    cache = result.provenance.get("parent_outputs", {}).get("cache")
    click.echo(
        f"distilled checkpoint written to {result.out_dir} ({targets} targets"
        f"{', parent outputs from cache' if cache == 'hit' else ''}; {result.provenance['sentences']['train']} train / "
        f"{result.provenance['sentences']['dev']} dev sentences; {run['step']} steps, stopped by {run['stopped']}; "
        f"dev loss {run['dev_loss_initial']:.3f} -> {run['best_dev_loss']:.3f} at step {run['best_step']})"
    )
