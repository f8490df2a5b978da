"""`packager export gguf` and `packager prune-gguf` (registered lazily by packager.cli).

Library errors (PackagerError) propagate to packager.cli.main, which prints one line."""
from __future__ import annotations

import click

from converters.gguf.errors import GGUFExportError
from runtime.errors import EdgeError

QUANT_HELP = "comma-separated llama.cpp quantization types (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ...): also write FILE.<TYPE>.gguf for each"


def _as_packager_error(exc: EdgeError) -> GGUFExportError:
    return GGUFExportError(str(exc))


@click.command("gguf")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--out", "out_file", required=True, type=click.Path(path_type=str), help="output FILE.gguf")
@click.option("--quant", default=None, help=QUANT_HELP)
@click.option("--dtype", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="weights of FILE.gguf (routers and norms are always F32)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="quantizer threads (default: all cores)")
@click.option("--no-hash", is_flag=True, help="do not sha256 the input shards for provenance (faster on huge models)")
@click.option("--force", is_flag=True, help="overwrite existing outputs")
def export_gguf_command(model_dir, out_file, quant, dtype, threads, no_hash, force) -> None:
    """Export a (pruned) Hugging Face MoE checkpoint MODEL_DIR to GGUF for llama.cpp.

    Writes FILE.gguf and FILE.export.json (the runtime's export config); with --quant also
    FILE.<TYPE>.gguf and FILE.<TYPE>.export.json per type."""
    from converters.gguf.export import export_gguf, quantized_path
    from converters.gguf.quantize import parse_quant_types

    try:
        path = export_gguf(model_dir, out_file, quant, dtype=dtype, force=force, hash_inputs=not no_hash,
                           progress=True, n_threads=threads)
    except EdgeError as exc:
        raise _as_packager_error(exc) from None
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")
    for quant_type in parse_quant_types(quant):
        qpath = quantized_path(path, quant_type)
        click.echo(f"wrote {qpath} ({qpath.stat().st_size:,} bytes)")


@click.command("prune-gguf")
@click.argument("in_file", type=click.Path(path_type=str))
@click.option("--plan", "plan_file", required=True, type=click.Path(path_type=str), help="plan JSON (packager plan create)")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=str), help="output FILE.gguf")
@click.option("--force", is_flag=True, help="overwrite an existing output")
def prune_gguf_command(in_file, plan_file, out_file, force) -> None:
    """Prune the experts of an existing (possibly quantized) GGUF IN_FILE without dequantising."""
    from converters.gguf.prune_gguf import prune_gguf

    try:
        path = prune_gguf(in_file, plan_file, out_file, force=force, progress=True)
    except EdgeError as exc:
        raise _as_packager_error(exc) from None
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")
