"""training/batching.py: token batches are deterministic, bounded, complete, and disjoint across processes."""

import random
from collections import Counter

import pytest
import torch
from datasets import Dataset

from training.batching import (
    TokenBatchSampler, TrainingBatches, collate, optimizer_steps, pack_by_tokens, split_until_divisible, stream_batches,
)


@pytest.fixture(scope="module")
def lengths():
    rng = random.Random(0)
    return [rng.randint(3, 60) for _ in range(997)] + [300]  # one example longer than max_tokens


def flat(batches):
    return [i for batch in batches for i in batch]


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ(lengths):
    sampler = TokenBatchSampler(lengths, max_tokens=256, seed=7)
    assert sampler.epoch_batches(0) == TokenBatchSampler(lengths, 256, seed=7).epoch_batches(0)
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)
    assert sampler.epoch_batches(0) != TokenBatchSampler(lengths, 256, seed=8).epoch_batches(0)


def test_each_epoch_covers_every_example_once_within_the_token_budget(lengths):
    batches = TokenBatchSampler(lengths, max_tokens=256, seed=7).epoch_batches(3)
    assert sorted(flat(batches)) == list(range(len(lengths)))
    for batch in batches:
        cost = len(batch) * max(lengths[i] for i in batch)
        assert cost <= 256 or len(batch) == 1  # an oversize example travels alone
    # length bucketing: padding is small compared with random batches of the same sizes
    padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    assert padding < 0.2 * sum(lengths)


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_get_disjoint_batches_that_together_cover_the_epoch(lengths, world_size):
    shards = [TokenBatchSampler(lengths, 256, seed=7, rank=r, world_size=world_size).epoch_batches(1)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # same number of steps everywhere, or DDP would hang
    counts = Counter(flat(flat(shards)))
    assert sorted(counts) == list(range(len(lengths))) and set(counts.values()) == {1}


def test_splitting_for_processes_keeps_every_example_once():
    batches = [[0, 1, 2, 3], [4], [5, 6]]
    split = split_until_divisible(batches, 2)
    assert len(split) % 2 == 0 and sorted(flat(split)) == list(range(7))
    with pytest.raises(ValueError):
        split_until_divisible([[0], [1], [2]], 2)


def test_pack_respects_order_and_budget():
    # cost = examples x longest: [2, 2, 4] would be 3 x 4 = 12 > 8
    assert pack_by_tokens([0, 1, 2, 3], [2, 2, 4, 4], max_tokens=8) == [[0, 1], [2, 3]]
    assert pack_by_tokens([0, 1, 2, 3], [2, 2, 2, 4], max_tokens=8) == [[0, 1, 2], [3]]
    assert pack_by_tokens([3, 2, 1, 0], [2, 2, 2, 4], max_tokens=8) == [[3, 2], [1, 0]]


def test_stream_batches_are_disjoint_across_processes_and_deterministic():
    rng = random.Random(1)
    examples = [{"input_ids": [1] * rng.randint(2, 30), "labels": [1] * rng.randint(2, 30), "id": i}
                for i in range(500)]
    shards = [list(stream_batches(iter(examples), 128, seed=3, epoch=0, rank=r, world_size=2, buffer_size=120))
              for r in range(2)]
    ids = [[e["id"] for batch in shard for e in batch] for shard in shards]
    assert len(shards[0]) == len(shards[1])
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(500))
    again = list(stream_batches(iter(examples), 128, seed=3, epoch=0, rank=0, world_size=2, buffer_size=120))
    assert [[e["id"] for e in b] for b in again] == [[e["id"] for e in b] for b in shards[0]]


def test_collate_pads_sources_with_pad_and_labels_with_ignore_index():
    batch = collate([{"input_ids": [5, 6, 2], "labels": [7, 2]}, {"input_ids": [5, 2], "labels": [8, 9, 2]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [5, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 2, -100], [8, 9, 2]]
    assert batch["input_ids"].dtype == torch.long


def test_optimizer_steps_group_micro_batches_and_keep_the_tail():
    assert list(optimizer_steps(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_training_batches_of_a_dataset_give_each_process_its_own_rows():
    rng = random.Random(2)
    rows = [[i] * rng.randint(2, 40) for i in range(300)]  # the row id is the token, so batches can be traced
    train = Dataset.from_dict({"input_ids": rows, "labels": rows, "length": [len(r) for r in rows]})
    seen = [[e["input_ids"][0] for batch in TrainingBatches(train, 200, seed=5, rank=r, world_size=2).epoch(4)
             for e in batch] for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(300))
    again = [e["input_ids"][0] for batch in TrainingBatches(train, 200, seed=5, rank=0, world_size=2).epoch(4)
             for e in batch]
    assert again == seen[0]
