"""Token-based batching: length buckets, reshuffled each epoch, deterministic under a seed, split across processes.

A batch costs `examples * longest side` tokens (fairseq's `--max-tokens` count: padded max(source, target)).
Every process builds the same list of batches from (seed, epoch), whatever the number of processes, and takes its
turn in each round of `world_size` batches (`Deal`), so the processes see disjoint batches that together cover each
example once per epoch. How many batches of the list are done is the epoch's position: a run resumes there, with the
same or another number of processes, without building the batches before it.
"""

import dataclasses
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


def epoch_batches(lengths: list[int], max_tokens: int, seed) -> list[list[int]]:
    """All batches of one pass over `lengths`, in a random order: shuffle, stable sort by length, pack, shuffle batches.

    The first shuffle makes equal-length examples meet in a different order each time; the sort keeps padding low.
    The list does not depend on the number of processes, so a position in it (how many batches of the epoch are
    done) means the same data under any number of processes.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches = pack_by_tokens(order, lengths, max_tokens)
    rng.shuffle(batches)
    return batches


def split_into(batches: list[list[int]], pieces: int) -> list[list[int]] | None:
    """`batches` split into exactly `pieces` batches by halving the largest, every example kept once; None when they
    hold fewer than `pieces` examples."""
    batches = list(batches)
    if sum(map(len, batches)) < pieces:
        return None
    while len(batches) < pieces:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        half = len(batches[largest]) // 2
        batches[largest:largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches


@dataclasses.dataclass
class Deal:
    """The batches of one epoch (or stream buffer) from a position on, dealt to `world_size` processes.

    Every process must run the same number of micro-batches (DDP hangs otherwise), so the last `len % world_size`
    batches (the tail) are split into exactly `world_size` smaller ones, one each; a tail of fewer examples than
    processes cannot be shared and is left out of this epoch (`left_out` counts them; the next epoch's shuffle puts
    other examples last). Each round of `world_size` batches advances the position by `world_size`; the tail's round
    ends the list.
    """
    rounds: list[list[list[int]]]  # rounds[j][rank]: the batch of process `rank` in round j
    positions: list[int]  # positions[j]: batches of the whole list done after round j
    left_out: int  # examples left out of the tail

    @classmethod
    def of(cls, batches: list[list[int]], start: int, world_size: int) -> "Deal":
        remaining = batches[start:]
        whole = len(remaining) - len(remaining) % world_size
        rounds = [remaining[j:j + world_size] for j in range(0, whole, world_size)]
        positions = [start + j + world_size for j in range(0, whole, world_size)]
        tail, left_out = remaining[whole:], 0
        if tail:
            pieces = split_into(tail, world_size)
            if pieces is None:
                left_out = sum(map(len, tail))
            else:
                rounds.append(pieces)
                positions.append(len(batches))
        return cls(rounds, positions, left_out)

    def of_process(self, rank: int) -> list[tuple[list[int], int]]:
        """(batch, position after its round) of process `rank`, in order."""
        return [(batches[rank], position) for batches, position in zip(self.rounds, self.positions)]


class TokenBatchSampler:
    """The batches of one process for a given epoch, over an in-memory (map-style) dataset.

    `lengths[i]` is the padded cost of example i (max of source and target tokens).
    """

    def __init__(self, lengths: list[int], max_tokens: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.lengths, self.max_tokens, self.seed = list(lengths), max_tokens, seed
        self.rank, self.world_size = rank, world_size

    def deal(self, epoch: int, start: int = 0) -> Deal:
        # (seed, epoch) as a string: Random() takes no tuples, and a string seed is hashed the same in every process
        return Deal.of(epoch_batches(self.lengths, self.max_tokens, f"{self.seed}-{epoch}"), start, self.world_size)

    def epoch_batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This process's batches of `epoch`, from global position `start` on."""
        return [batch for batch, _ in self.deal(epoch, start).of_process(self.rank)]


class EpochPass:
    """One process's pass over an epoch from a global position: iterating gives (examples, position after the
    micro-batch's round); `left_out` counts the examples no process could take (see Deal), final once the pass is
    over (a stream learns it buffer by buffer)."""

    def __init__(self):
        self.batches: Iterator[tuple[list[dict], int]] = iter(())
        self.left_out = 0

    def __iter__(self):
        return self.batches


def stream_batches(examples: Iterable[dict], max_tokens: int, seed: int, epoch: int, rank: int = 0,
                   world_size: int = 1, buffer_size: int = 100_000, start: int = 0, counts: EpochPass | None = None
                   ) -> Iterator[tuple[list[dict], int]]:
    """Token batches over a stream (huge corpora): bucket within buffers of `buffer_size` examples.

    Every process reads the whole stream and takes its share of each buffer's batches (`Deal`), so the split stays
    disjoint and equal per buffer without knowing the stream's length. Positions count the batches of the epoch's
    buffers so far; a pass from `start` reads the earlier buffers but batches none of their examples.
    """
    buffer, buffer_index, done = [], 0, 0

    def flush():
        nonlocal done
        lengths = [max(len(example["input_ids"]), len(example["labels"])) for example in buffer]
        batches = epoch_batches(lengths, max_tokens, f"{seed}-{epoch}-{buffer_index}")
        if start < done + len(batches):
            deal = Deal.of(batches, max(start - done, 0), world_size)
            if counts is not None:
                counts.left_out += deal.left_out
            for batch, position in deal.of_process(rank):
                yield [buffer[i] for i in batch], done + position
        done += len(batches)

    for example in examples:
        buffer.append(example)
        if len(buffer) == buffer_size:
            yield from flush()
            buffer, buffer_index = [], buffer_index + 1
    if buffer:
        yield from flush()


class TrainingBatches:
    """This process's micro-batches (lists of examples), epoch by epoch, from a map-style dataset or a stream."""

    def __init__(self, train, max_tokens: int, seed: int, rank: int = 0, world_size: int = 1):
        self.train, self.max_tokens, self.seed, self.rank, self.world_size = train, max_tokens, seed, rank, world_size
        if isinstance(train, Dataset):
            self.sampler = TokenBatchSampler(train["length"], max_tokens, seed, rank, world_size)
            self.columns = train.select_columns(["input_ids", "labels"])

    def epoch(self, epoch: int, start: int = 0) -> EpochPass:
        """The pass over `epoch` from global position `start` (batches of the epoch already done by all processes):
        the batches before it are skipped without reading their examples (a stream is read, not batched)."""
        epoch_pass = EpochPass()
        if isinstance(self.train, Dataset):
            deal = self.sampler.deal(epoch, start)
            epoch_pass.batches, epoch_pass.left_out = self._rows(deal.of_process(self.rank)), deal.left_out
            return epoch_pass
        stream = self.train.shuffle(seed=self.seed, buffer_size=10_000)
        stream.set_epoch(epoch)
        epoch_pass.batches = stream_batches(stream, self.max_tokens, self.seed, epoch, self.rank, self.world_size,
                                            start=start, counts=epoch_pass)
        return epoch_pass

    def _rows(self, batches):
        for indices, position in batches:
            rows = self.columns[indices]
            yield [dict(zip(rows, values)) for values in zip(*rows.values())], position


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
