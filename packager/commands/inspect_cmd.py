"""`packager inspect MODEL`: family, layers, experts, top-k and where the bytes are."""
from __future__ import annotations

import json

import click


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return str(nbytes)


@click.command("inspect")
@click.argument("model", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def inspect_command(model: str, as_json: bool) -> None:
    """Describe a local Hugging Face MoE checkpoint (safetensors)."""
    from packager.model_summary import summarize_checkpoint

    summary = summarize_checkpoint(model)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = sorted(set(summary["experts_per_layer"].values()))
    experts = (f"{counts[0]} per layer" if len(counts) == 1
               else "per layer " + ", ".join(f"{k}:{v}" for k, v in summary["experts_per_layer"].items()))
    console.print(f"[bold]{summary['model_dir']}[/bold]  family [bold]{summary['family']}[/bold]")
    console.print(f"layers {summary['n_layers']} (MoE {len(summary['moe_layers'])}, dense {summary['dense_layers'] or 'none'})")
    ks = summary["top_k_per_layer"]
    top_k = summary["top_k"] if len(set(ks)) <= 1 else f"per MoE layer {','.join(map(str, ks))}"
    console.print(f"routed experts {experts}; top-k {top_k}; routing {summary['routing']}"
                  f"{' renormalised' if summary['renormalised'] else ''}"
                  f"{'; router bias' if summary['router_bias'] else ''}"
                  f"{'; score-correction bias' if summary['score_correction_bias'] else ''}")
    console.print(f"shared experts: {'yes (never pruned)' if summary['shared_experts'] else 'no'}; "
                  f"expert layout on disk: {', '.join(summary['expert_layouts'])}; shards {summary['shards']}")
    table = Table("part", "params", "share", "bytes", "share")
    for part, values in summary["split"].items():
        table.add_row(part.replace("_", " "), f"{values['params']:,}", f"{values['params_share']:.1%}",
                      _human(values["bytes"]), f"{values['bytes_share']:.1%}")
    table.add_row("total", f"{summary['total_params']:,}", "", _human(summary["total_bytes"]), "")
    console.print(table)
    console.print(f"fingerprint {summary['fingerprint']}")
    if summary["pruned_from"]:
        console.print(f"pruned from {summary['pruned_from']}")
