"""The small packs file the `packager build` tests run: one drop ratio, a few sentences."""
from __future__ import annotations

from pathlib import Path


def packs_toml(parent: str, variants: str, drops: str = "[0.5]", extra: str = "") -> str:
    """A packs file for `parent` with the given [[variant]] tables; `extra` lines go to the top level."""
    return f'''
parent = "{parent}"
drop_ratios = {drops}
threads = 1
{extra}
[calibration]
data = ["data.jsonl"]
max_sentences = 4
max_new_tokens = 6
batch_size = 4

[verify]
test = "data.jsonl"
max_new_tokens = 12
bootstrap = 0
{variants}
[[pack]]
name = "en-de-fr"
directions = "en->de,fr"
'''


def build_dir(work: Path, packs: str | None = None) -> Path:
    """What a build test runs on: the tiny parent (3 layers), its test data and, given, the packs file."""
    from test_bundle import build_translator, write_test_data

    build_translator(work / "parent", num_hidden_layers=3)
    write_test_data(work / "data.jsonl")
    if packs is not None:
        (work / "packs.toml").write_text(packs)
    return work
