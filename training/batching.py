"""Token-based batching: length buckets, reshuffled each epoch, deterministic under a seed, split across processes.

A batch costs `examples * longest side` tokens (fairseq's `--max-tokens` count: padded max(source, target)).
Every process builds the same global list of batches from (seed, epoch) and keeps every world_size-th one, so the
processes see disjoint batches that together cover each example exactly once per epoch.
"""

import random
from collections.abc import Iterable, Iterator

import torch
from datasets import Dataset


def pack_by_tokens(order: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedily pack examples, in the given order, into batches of at most `max_tokens` padded tokens.

    An example longer than `max_tokens` gets a batch of its own rather than being dropped silently.
    """
    batches, current, longest = [], [], 0
    for index in order:
        new_longest = max(longest, lengths[index])
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], lengths[index]
        current.append(index)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def split_until_divisible(batches: list[list[int]], num_shards: int) -> list[list[int]]:
    """Halve the largest batches until every process gets the same number of batches.

    DDP hangs if one process runs one more step than another; splitting keeps every example exactly once, where
    padding by repetition (accelerate's `even_batches`) would duplicate some.
    """
    batches = list(batches)
    while len(batches) % num_shards:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            raise ValueError(f"{len(batches)} single-example batches cannot be shared evenly by {num_shards} processes")
        half = len(batches[largest]) // 2
        batches[largest:largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches


def bucket_batches(lengths: list[int], max_tokens: int, seed: int, num_shards: int = 1) -> list[list[int]]:
    """All batches of one pass over `lengths`, in a random order: shuffle, stable sort by length, pack, shuffle batches.

    The first shuffle makes equal-length examples meet in a different order each time; the sort keeps padding low.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches = split_until_divisible(pack_by_tokens(order, lengths, max_tokens), num_shards)
    rng.shuffle(batches)
    return batches


class TokenBatchSampler:
    """The batches of one process for a given epoch, over an in-memory (map-style) dataset.

    `lengths[i]` is the padded cost of example i (max of source and target tokens).
    """

    def __init__(self, lengths: list[int], max_tokens: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.lengths, self.max_tokens, self.seed = list(lengths), max_tokens, seed
        self.rank, self.world_size = rank, world_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        # (seed, epoch) as a string: Random() takes no tuples, and a string seed is hashed the same in every process
        batches = bucket_batches(self.lengths, self.max_tokens, f"{self.seed}-{epoch}", self.world_size)
        return batches[self.rank::self.world_size]


def stream_batches(examples: Iterable[dict], max_tokens: int, seed: int, epoch: int, rank: int = 0,
                   world_size: int = 1, buffer_size: int = 100_000) -> Iterator[list[dict]]:
    """Token batches over a stream (huge corpora): bucket within buffers of `buffer_size` examples.

    Every process reads the whole stream and keeps its share of each buffer's batches, so the split stays disjoint
    and equal per buffer without knowing the stream's length.
    """
    buffer, buffer_index = [], 0
    for example in examples:
        buffer.append(example)
        if len(buffer) == buffer_size:
            yield from _buffer_batches(buffer, max_tokens, f"{seed}-{epoch}-{buffer_index}", rank, world_size)
            buffer, buffer_index = [], buffer_index + 1
    if len(buffer) >= world_size:  # a tail smaller than the number of processes cannot be shared: dropped
        yield from _buffer_batches(buffer, max_tokens, f"{seed}-{epoch}-{buffer_index}", rank, world_size)


def _buffer_batches(buffer, max_tokens, seed, rank, world_size):
    lengths = [max(len(example["input_ids"]), len(example["labels"])) for example in buffer]
    for batch in bucket_batches(lengths, max_tokens, seed, world_size)[rank::world_size]:
        yield [buffer[i] for i in batch]


class TrainingBatches:
    """This process's micro-batches (lists of examples), epoch by epoch, from a map-style dataset or a stream."""

    def __init__(self, train, max_tokens: int, seed: int, rank: int = 0, world_size: int = 1):
        self.train, self.max_tokens, self.seed, self.rank, self.world_size = train, max_tokens, seed, rank, world_size
        if isinstance(train, Dataset):
            self.sampler = TokenBatchSampler(train["length"], max_tokens, seed, rank, world_size)
            self.columns = train.select_columns(["input_ids", "labels"])

    def epoch(self, epoch: int) -> Iterator[list[dict]]:
        if isinstance(self.train, Dataset):
            for indices in self.sampler.epoch_batches(epoch):
                rows = self.columns[indices]
                yield [dict(zip(rows, values)) for values in zip(*rows.values())]
        else:
            stream = self.train.shuffle(seed=self.seed, buffer_size=10_000)
            stream.set_epoch(epoch)
            yield from stream_batches(stream, self.max_tokens, self.seed, epoch, self.rank, self.world_size)


def optimizer_steps(batches, accumulation: int):
    """Group micro-batches by `accumulation`; the epoch's last group may be shorter (nothing is dropped)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == accumulation:
            yield group
            group = []
    if group:
        yield group


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sources with pad (+ attention mask) and labels with -100, as the model expects."""
    sources = [torch.tensor(e["input_ids"]) for e in examples]
    labels = [torch.tensor(e["labels"]) for e in examples]
    input_ids = torch.nn.utils.rnn.pad_sequence(sources, batch_first=True, padding_value=pad_token_id)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sources], batch_first=True)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)}
