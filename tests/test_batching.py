"""packager.batching: the length-bucketed batches that distill and the default model's recipe share."""
from __future__ import annotations

import random

import torch

from packager.batching import collate, token_batches


def _examples(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [(list(range(1, length + 1)), length // 2) for length in (rng.randrange(1, 40) for _ in range(n))]


def test_every_example_once_and_no_batch_over_the_budget():
    examples = _examples(500)
    batches = token_batches(examples, 128, random.Random(3), window=64)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    for batch in batches:
        assert max(len(examples[i][0]) for i in batch) * len(batch) <= 128
    # all randomness from the rng: the same seed gives the same batches (resumed runs rely on it)
    assert token_batches(examples, 128, random.Random(3), window=64) == batches
    assert token_batches(examples, 128, random.Random(4), window=64) != batches


def test_the_epoch_order_may_repeat_examples_and_long_ones_stand_alone():
    examples = [([5] * 10, 2), ([6] * 300, 1), ([7] * 10, 0)]
    batches = token_batches(examples, 100, random.Random(0), order=[0, 0, 1, 2])
    assert sorted(i for batch in batches for i in batch) == [0, 0, 1, 2]
    assert [1] in batches  # 300 tokens > 100: a batch of its own
    assert sorted(map(sorted, batches)) == [[0, 0, 2], [1]]


def test_collate_pads_right_and_labels_only_the_target():
    examples = [([11, 12, 13, 14], 2), ([21, 22], 1)]
    ids, labels, mask = collate(examples, [1, 0], pad_id=0)
    assert ids.tolist() == [[21, 22, 0, 0], [11, 12, 13, 14]]
    assert labels.tolist() == [[-100, 22, -100, -100], [-100, -100, 13, 14]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ids.dtype == labels.dtype == mask.dtype == torch.long
