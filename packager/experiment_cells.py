"""One scored cell of `make experiments`, and its cache.

A cell is one model (the parent, optionally masked to kept experts, or a pruned/distilled
checkpoint) translating one seeded test sample of one direction, greedy and batched, scored by
packager.quality. It is cached as `OUT/cells/<key digest>.json`. The key holds everything the
result depends on: the model fingerprint, the kept experts, the direction, the sample, the
decoding settings, and `code`: the digest of this module's source files and of every project
module it runs (packager.core.code_version), so a change to the scorer, the masking or the generator
computes the cell again instead of reusing a result the new code would not give.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from packager.pair_data import bound_description, digest, generation_bound

CELL_FORMAT = "packager.experiment-cell/1"


def cell_code() -> str:
    """Digest of the code that computes a cell (see the module docstring)."""
    from packager.core.code_version import code_digest

    return code_digest(__name__)


def decoding(batch_size: int, max_new_tokens: int) -> dict:
    return {"kind": "greedy", "batch_size": batch_size, "max_new_tokens": bound_description(max_new_tokens)}


class CellCache:
    """Cells as JSON files in one directory, found by the digest of their key."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def key(self, **fields) -> dict:
        return {"format": CELL_FORMAT, **fields, "code": cell_code()}

    def path(self, key: dict) -> Path:
        return self.directory / f"{digest(key)[:40]}.json"

    def load(self, key: dict) -> dict | None:
        """The cached metrics for `key`, or None (absent, unreadable, or another key)."""
        path = self.path(key)
        try:
            cell = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cell["metrics"] if isinstance(cell, dict) and cell.get("key") == key else None

    def store(self, key: dict, label: str, metrics: dict, srcs: Sequence[str], refs: Sequence[str],
              hyps: Sequence[str]) -> None:
        from runtime.atomic import atomic_write_json

        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path(key), {"key": key, "label": label, "metrics": metrics,
                                           "segments": [{"src": s, "ref": r, "hyp": h} for s, r, h in zip(srcs, refs, hyps)]})


def translate(model, prompts: list, eos_id: int, pad_id: int, keep: dict[int, list[int]] | None,
              max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy outputs of `model` (masked to `keep` when given) for tokenised prompts."""
    from packager.distill import greedy_generate
    from packager.masking import expert_mask

    bound = generation_bound(max_new_tokens)
    if keep is None:
        return greedy_generate(model, prompts, eos_id, pad_id, max_new_tokens=bound, batch_size=batch_size)
    with expert_mask(model, keep):
        return greedy_generate(model, prompts, eos_id, pad_id, max_new_tokens=bound, batch_size=batch_size)


def score(slug: str, srcs: Sequence[str], refs: Sequence[str], hyps: Sequence[str], languages: Sequence[str],
          n_bootstrap: int) -> dict:
    """packager.quality's direction scores, the length ratio taken from this sample's references."""
    from packager.quality import ErrorDetector, score_direction, usual_length_ratio

    src_lang, tgt_lang = slug.split("-")
    detector = ErrorDetector(list(languages), {(src_lang, tgt_lang): usual_length_ratio(srcs, refs)})
    return score_direction(srcs, refs, hyps, src_lang, tgt_lang, detector, n_bootstrap)[0]
