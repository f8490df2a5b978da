"""Translation-pair records and their batches: the helpers plan search, expert merging and the
experiment cells share (JSONL reading, padded batches, the generation bound, plan digests)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

PAIR_KEYS = ("src_lang", "tgt_lang", "src", "tgt")
# generation bound per batch: 2 x the longest prompt + 10 tokens. Tighter than `packager
# verify` (3x + 12) because looping outputs of damaged masks dominate a sweep's cost; a loop is
# still caught by the repetition detector.
NEW_TOKENS_PER_SOURCE_TOKEN = 2
NEW_TOKENS_SLACK = 10


def iter_pair_records(path: Path, error: type[Exception], what: str = "data") -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL file of {src_lang, tgt_lang, src, tgt} records (other keys kept).
    A missing file or a malformed line raises `error` with one line naming the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise error(f"{path}: {what} file not found") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            for key in PAIR_KEYS:
                record[key]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise error(f"{path}:{number}: not a JSONL record with src_lang, tgt_lang, src, tgt ({exc})") from None
        yield number, record


def generation_bound(max_new_tokens: int):
    """New-token bound of a batch whose longest prompt has n tokens (see the constants)."""
    def bound(longest_prompt: int) -> int:
        return min(max_new_tokens, NEW_TOKENS_PER_SOURCE_TOKEN * longest_prompt + NEW_TOKENS_SLACK)
    return bound


def bound_description(max_new_tokens: int) -> str:
    return f"min({max_new_tokens}, {NEW_TOKENS_PER_SOURCE_TOKEN} x longest prompt in the batch + {NEW_TOKENS_SLACK})"


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int):
    """Right-padded token ids and attention mask (torch tensors) of a batch of sequences."""
    import torch

    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(list(seq))
        attn[row, :len(seq)] = 1
    return ids, attn


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def canonical_keep(keep: dict[int, list[int]] | None) -> dict[str, list[int]] | None:
    """A plan's kept experts in a form that hashes the same for the same mask."""
    return None if keep is None else {str(k): sorted(int(e) for e in v) for k, v in sorted(keep.items())}
