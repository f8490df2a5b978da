"""Length-bucketed training batches of (prompt + target) token ids, for `packager distill` and the
default model's training recipe (models/train_default.py): one implementation, so that both cut
and pad batches the same way."""
from __future__ import annotations

import random
from typing import Sequence

# an example is (token ids, prompt length): the loss counts only the ids after the prompt
TokenExample = tuple[Sequence[int], int]


def token_batches(examples: Sequence[TokenExample], batch_tokens: int, rng: random.Random, *,
                  order: list[int] | None = None, window: int = 4096) -> list[list[int]]:
    """Batches of example indices with at most `batch_tokens` padded tokens each (longest x count;
    a single longer example is a batch of its own), in random order.

    `order` is the epoch's indices (default: every example once; repeats are allowed). It is
    shuffled, sorted by length inside windows of `window` indices so that a batch holds similar
    lengths, cut, and the batches are shuffled: all randomness comes from `rng`, in that order."""
    order = list(range(len(examples))) if order is None else order
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i][0]))
        batch, longest = [], 0
        for i in chunk:
            length = len(examples[i][0])
            if batch and max(longest, length) * (len(batch) + 1) > batch_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, length)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[TokenExample], batch: list[int], pad_id: int, device: str = "cpu"):
    """(input ids, labels, attention mask) of a batch, right-padded; labels are -100 on the prompt and
    the padding, so the loss counts the target tokens only."""
    import torch

    longest = max(len(examples[i][0]) for i in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, i in enumerate(batch):
        tokens, prompt_len = examples[i]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, prompt_len:len(tokens)] = torch.tensor(tokens[prompt_len:])
        mask[row, :len(tokens)] = 1
    return ids.to(device), labels.to(device), mask.to(device)
