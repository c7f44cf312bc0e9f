"""training/batching.py: token batches are deterministic, bounded, complete, and disjoint across processes."""

import random
from collections import Counter

import pytest
import torch
from datasets import Dataset

from training.batching import (
    Deal, TokenBatchSampler, TrainingBatches, collate, epoch_batches, optimizer_steps, pack_by_tokens, stream_batches,
)


@pytest.fixture(scope="module")
def lengths():
    rng = random.Random(0)
    return [rng.randint(3, 60) for _ in range(997)] + [300]  # one example longer than max_tokens


def stream_examples(seed: int, count: int = 500) -> list[dict]:
    """Examples of random lengths that say which they are (`id`)."""
    rng = random.Random(seed)
    return [{"input_ids": [1] * rng.randint(2, 30), "labels": [1] * rng.randint(2, 30), "id": i} for i in range(count)]


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


def test_a_tail_of_fewer_batches_than_processes_is_split_one_each():
    deal = Deal.of([[0, 1, 2, 3], [4, 5], [6, 7, 8], [9, 10, 11, 12]], start=0, world_size=3)  # a round, a tail
    assert deal.rounds[1] == [[9], [10], [11, 12]] and deal.positions == [3, 4] and deal.left_out == 0
    assert sorted(flat(flat(deal.rounds))) == list(range(13))


def test_a_tail_too_small_to_share_is_left_out_and_counted_never_an_error():
    # nearly every batch one long example: 5 single-example batches, 4 processes
    deal = Deal.of([[0], [1], [2], [3], [4]], start=0, world_size=4)
    assert deal.rounds == [[[0], [1], [2], [3]]] and deal.left_out == 1
    assert Deal.of([[0]], start=0, world_size=2).rounds == [] and Deal.of([[0]], 0, 2).left_out == 1


@pytest.mark.parametrize("before, after", [(2, 1), (1, 3), (3, 2)])
def test_a_position_means_the_same_data_under_another_number_of_processes(lengths, before, after):
    """Stopped after k rounds with `before` processes, resumed with `after`: every example of the epoch exactly once."""
    batches = epoch_batches(lengths, 256, "7-0")
    first = Deal.of(batches, 0, before)
    k = len(first.rounds) // 3
    done = flat(flat(first.rounds[:k]))
    rest = [TokenBatchSampler(lengths, 256, seed=7, rank=r, world_size=after).epoch_batches(0, first.positions[k - 1])
            for r in range(after)]
    assert len({len(share) for share in rest}) == 1
    seen = Counter(done + flat(flat(rest)))
    left_out = Deal.of(batches, first.positions[k - 1], after).left_out
    assert set(seen.values()) == {1} and len(seen) == len(lengths) - left_out


def test_stream_batches_resume_at_a_position_under_another_number_of_processes():
    examples = stream_examples(seed=4)
    two = [list(stream_batches(iter(examples), 128, seed=3, epoch=0, rank=r, world_size=2, buffer_size=120))
           for r in range(2)]
    k = len(two[0]) // 2
    position = two[0][k - 1][1]
    assert position == two[1][k - 1][1]  # every process agrees on the position
    done = [e["id"] for shard in two for batch, _ in shard[:k] for e in batch]
    rest = [[e["id"] for batch, _ in stream_batches(iter(examples), 128, seed=3, epoch=0, rank=r, world_size=3,
                                                     buffer_size=120, start=position) for e in batch]
            for r in range(3)]
    seen = Counter(done + flat(rest))
    assert set(seen.values()) == {1} and len(seen) >= 500 - 2 * 5  # at most (world - 1) left out per buffer


def test_pack_respects_order_and_budget():
    # cost = examples x longest: [2, 2, 4] would be 3 x 4 = 12 > 8
    assert pack_by_tokens([0, 1, 2, 3], [2, 2, 4, 4], max_tokens=8) == [[0, 1], [2, 3]]
    assert pack_by_tokens([0, 1, 2, 3], [2, 2, 2, 4], max_tokens=8) == [[0, 1, 2], [3]]
    assert pack_by_tokens([3, 2, 1, 0], [2, 2, 2, 4], max_tokens=8) == [[3, 2], [1, 0]]


def test_stream_batches_are_disjoint_across_processes_and_deterministic():
    examples = stream_examples(seed=1)
    shards = [list(stream_batches(iter(examples), 128, seed=3, epoch=0, rank=r, world_size=2, buffer_size=120))
              for r in range(2)]
    ids = [[e["id"] for batch, _ in shard for e in batch] for shard in shards]
    assert len(shards[0]) == len(shards[1])
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(500))
    again = list(stream_batches(iter(examples), 128, seed=3, epoch=0, rank=0, world_size=2, buffer_size=120))
    assert [[e["id"] for e in b] for b, _ in again] == [[e["id"] for e in b] for b, _ in shards[0]]


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
    seen = [[e["input_ids"][0] for batch, _ in TrainingBatches(train, 200, seed=5, rank=r, world_size=2).epoch(4)
             for e in batch] for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(300))
    again = [e["input_ids"][0] for batch, _ in TrainingBatches(train, 200, seed=5, rank=0, world_size=2).epoch(4)
             for e in batch]
    assert again == seen[0]


def test_resuming_mid_epoch_reads_no_row_of_the_batches_before_the_position(monkeypatch):
    rows = [[i] * (2 + i % 30) for i in range(300)]
    train = Dataset.from_dict({"input_ids": rows, "labels": rows, "length": [len(r) for r in rows]})
    batches = TrainingBatches(train, 200, seed=5)
    everything = [batch for batch, _ in batches.epoch(0)]
    read = []
    original = type(batches.columns).__getitem__
    monkeypatch.setattr(type(batches.columns), "__getitem__", lambda self, key: read.append(key) or original(self, key))
    rest = [batch for batch, _ in batches.epoch(0, start=10)]
    assert rest == everything[10:] and len(read) == len(everything) - 10  # one read per batch trained
