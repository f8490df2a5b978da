"""`packager verify MODEL_OR_BUNDLE --test FILE --pairs en-de,... --out METRICS.json`."""
from __future__ import annotations

import json

import click


def _line(slug: str, d: dict) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in d["errors"].items() if v) or "none"
    ci = f" ±{d['chrf++_ci95']}" if d.get("chrf++_ci95") is not None else ""
    return (f"{slug}: chrF++ {d['chrf++']}{ci}  BLEU {d['bleu']}  n={d['n']}  "
            f"error rate {d['error_rate']:.1%} ({errors}; references {d['reference_error_rate']:.1%})")


@click.command("verify")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--test", "test_file", required=True, type=click.Path(path_type=str),
              help="harvest JSONL test set (data/harvest/test.jsonl); X->en uses en->X records reversed")
@click.option("--pairs", required=True, multiple=True, help="directions: en-de,de-en or en->de,fr or en<->ja (repeatable)")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=str), help="metrics JSON to write")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="segments per direction, spread over the file")
@click.option("--parent", type=click.Path(path_type=str), default=None,
              help="parent export (same format and quantization) measured the same way, for ratios")
@click.option("--parent-metrics", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="reuse the parent's metrics JSON measured on the same selection instead of --parent")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="runtime threads (default: the backend's)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="cap on generated tokens per segment (also at most 3x the source tokens + 12)")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="resamples for the chrF++ confidence interval (0: none)")
@click.option("--json", "as_json", is_flag=True, help="print the metrics JSON to stdout")
def verify_command(model, test_file, pairs, out, limit, parent, parent_metrics, threads, max_new_tokens, n_bootstrap, as_json):
    """Run MODEL_OR_BUNDLE in the device runtime (a fresh process per model) on a test set:
    chrF++/BLEU, generation errors, file size, peak RSS, load time and tokens/s."""
    from packager.verify import VerifyError, verify

    if parent and parent_metrics:
        raise VerifyError("give either --parent or --parent-metrics, not both")
    metrics = verify(model, test_file, list(pairs), out, limit=limit, parent=parent, parent_metrics=parent_metrics,
                     threads=threads, max_new_tokens=max_new_tokens, n_bootstrap=n_bootstrap, progress=not as_json)
    if as_json:
        click.echo(json.dumps(metrics, indent=2, ensure_ascii=False))
        return
    for slug, d in metrics["directions"].items():
        click.echo(_line(slug, d))
    f = metrics["footprint"]
    click.echo(f"file {f['file_bytes'] / 1e6:.1f} MB, peak RSS {f['peak_rss_bytes'] / 1e6:.1f} MB "
               f"(anonymous {f['peak_rss_anon_bytes'] / 1e6:.1f} MB; above runtime baseline {f['peak_rss_above_baseline_bytes'] / 1e6:.1f} MB), "
               f"load {f['load_seconds']:.2f} s, prefill {f['prefill_tokens_per_second']:.0f} tok/s, "
               f"decode {f['decode_tokens_per_second']:.0f} tok/s, {f['threads']} thread(s)")
    if "ratios" in metrics:
        r = metrics["ratios"]
        click.echo(f"vs parent: file x{r['file_bytes']}, peak RSS x{r['peak_rss_bytes']}, chrF++ {r['chrf++_delta']:+.2f}, "
                   f"error rate {r['error_rate_delta']:+.2%}")
    click.echo(f"metrics written to {out}")
