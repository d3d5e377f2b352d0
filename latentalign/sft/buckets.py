"""Length buckets: batches with little padding whose examples stay mixed.

A padded batch costs its longest row times its size. Sorting by length (transformers' `group_by_length`)
removes the padding but makes each batch one kind of example: on the built-in data a batch of one length is
one question type, and SFT learned far slower that way (bench/README.md). Here the rows are split into a few
length ranges, chosen to minimise the padded tokens of an epoch, and every batch is drawn at random from one
range: a short batch holds every kind of single-turn question, only the long conversations wait for each other.
"""

from __future__ import annotations

import bisect
import random

import torch


def bucket_bounds(lengths: list[int], buckets: int) -> list[int]:
    """Upper length bounds of at most `buckets` ranges that minimise sum(rows in range x longest in range).

    Exact dynamic programme over the distinct lengths (a few hundred at most in practice)."""
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n] = counts.get(n, 0) + 1
    values = sorted(counts)
    prefix = [0]
    for v in values:
        prefix.append(prefix[-1] + counts[v])
    k = max(1, min(buckets, len(values)))
    inf = float("inf")
    # cost[j][i]: the least padded size of values[:i] split into j ranges, each padded to its largest value.
    cost = [[inf] * (len(values) + 1) for _ in range(k + 1)]
    cut = [[0] * (len(values) + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for j in range(1, k + 1):
        for i in range(1, len(values) + 1):
            for start in range(j - 1, i):
                c = cost[j - 1][start] + (prefix[i] - prefix[start]) * values[i - 1]
                if c < cost[j][i]:
                    cost[j][i], cut[j][i] = c, start
    bounds, i = [], len(values)
    for j in range(k, 0, -1):
        bounds.append(values[i - 1])
        i = cut[j][i]
    return sorted(set(bounds))


class LengthBucketSampler(torch.utils.data.Sampler):
    """Indices in batches of `batch_size` taken from one length range each; the order of the batches and the
    rows inside each range are shuffled, deterministically by `seed` and the epoch.

    Every row is yielded once per epoch; a range's last, partial batch is kept."""

    def __init__(self, lengths: list[int], batch_size: int, buckets: int = 3, seed: int = 0):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0
        self.bounds = bucket_bounds(self.lengths, buckets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        ranges: list[list[int]] = [[] for _ in self.bounds]
        for index, n in enumerate(self.lengths):
            ranges[bisect.bisect_left(self.bounds, n)].append(index)
        batches = []
        for rows in ranges:
            rng.shuffle(rows)
            batches += [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        for batch in self.batches():
            yield from batch


def bucketed_trainer(trainer_cls, buckets: int):
    """`trainer_cls` whose training sampler is a `LengthBucketSampler` over the tokenized rows' lengths."""

    class Bucketed(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if "input_ids" not in getattr(dataset, "column_names", ()):
                return super()._get_train_sampler(train_dataset)
            lengths = [len(ids) for ids in dataset["input_ids"]]
            # One bucket per optimizer step: accelerate hands process i the i-th of each run of per-device
            # batches, so a global batch stays in one range whatever the number of processes.
            args = self.args
            batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
            return LengthBucketSampler(lengths, batch, buckets, seed=args.seed)

    Bucketed.__name__ = Bucketed.__qualname__ = f"LengthBucketed{trainer_cls.__name__}"
    return Bucketed
