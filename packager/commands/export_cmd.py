"""`packager export gguf|onnx`: each format lives in converters/ and registers here lazily."""
import click

from packager.cli import LazyGroup

EXPORTERS = {
    "gguf": "converters.gguf.cli:export_gguf_command",
    "onnx": "converters.onnx.cli:export_onnx_command",
}


@click.group("export", cls=LazyGroup, lazy_commands=EXPORTERS)
def export_group() -> None:
    """Export a (pruned) Hugging Face checkpoint to a device format."""
