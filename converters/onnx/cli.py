"""`packager export onnx` (registered lazily by packager.commands.export_cmd).

Library errors (PackagerError) propagate to packager.cli.main, which prints one line."""
from __future__ import annotations

import click

from converters.onnx.options import DEFAULT_FORMULATION, DTYPES, FORMULATIONS, QUANT_TYPES

MOE_HELP = ("routed-expert formulation: contrib = ONNX Runtime's com.microsoft MoE/QMoE operator (fastest on CPU); "
            "sparse = standard ONNX ops only at fp32/int8 (loads in reduced/mobile builds; int4 needs MatMulNBits); "
            "dense = every expert on every token "
            "(baseline)")


@click.command("onnx")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="output directory")
@click.option("--quant", type=click.Choice(QUANT_TYPES), default="fp32", show_default=True,
              help="weights: fp32, int8 (dynamic quantization + 8-bit QMoE), int4 (MatMulNBits + 4-bit QMoE); routers stay fp32")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="storage of the weights that are not quantized (fp16 halves the file; ONNX Runtime computes in fp32)")
@click.option("--moe", "formulation", type=click.Choice(FORMULATIONS), default=DEFAULT_FORMULATION, show_default=True, help=MOE_HELP)
@click.option("--no-check", is_flag=True, help="skip the comparison with transformers on probe sequences")
@click.option("--no-hash", is_flag=True, help="do not sha256 the input shards for provenance (faster on huge models)")
@click.option("--force", is_flag=True, help="replace an existing output directory")
def export_onnx_command(model_dir, out_dir, quant, dtype, formulation, no_check, no_hash, force) -> None:
    """Export a (pruned) Hugging Face MoE checkpoint MODEL_DIR to ONNX for ONNX Runtime.

    Writes DIR/model.onnx (+ model.onnx.data when large), DIR/tokenizer.json and
    DIR/model.export.json. Each layer keeps its own expert count, so non-uniform pruned
    checkpoints export too. Weights stream from the shards one tensor at a time: memory stays
    bounded whatever the model's size."""
    import json

    from converters.onnx.export import export_onnx
    from runtime.backends import export_config_path

    path = export_onnx(model_dir, out_dir, quant, dtype=dtype, formulation=formulation, force=force, progress=True,
                       hash_inputs=not no_hash, check=not no_check)
    config = json.loads(export_config_path(path / "model.onnx").read_text(encoding="utf-8"))
    total = sum(config["quantization"]["bytes"].values())
    check = (config["extra"].get("export_check") or {}).get(quant if quant != "fp32" else dtype)
    counts = config["n_experts"]
    summary = f"wrote {path} ({total:,} bytes, {quant if quant != 'fp32' else dtype}, experts per layer {sorted(set(counts.values()))})"
    if check:
        summary += f"; max |logit diff| vs transformers {check['max_abs']:.3g}"
    click.echo(summary)
