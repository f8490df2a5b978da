"""The small packs file the `packager build` tests run: one drop ratio, a few sentences."""
from __future__ import annotations


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
