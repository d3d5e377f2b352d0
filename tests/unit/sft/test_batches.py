"""Sorted micro-batches for SFT: each optimizer step a random draw, every row once, less padding."""

import random

from latentalign.sft.batches import SortedMicroBatchSampler


def lengths_with_long_tail(n=600, seed=1):
    rng = random.Random(seed)
    return [rng.randint(100, 130) if rng.random() < 0.15 else rng.randint(40, 70) for _ in range(n)]


def test_every_row_once_and_each_step_a_sorted_random_draw():
    lengths = lengths_with_long_tail()
    sampler = SortedMicroBatchSampler(lengths, step_batch=32, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    steps = sampler.steps()
    assert [i for step in steps for i in step] == order
    assert all(len(step) == 32 for step in steps[:-1]) and 0 < len(steps[-1]) <= 32
    for step in steps:
        assert [lengths[i] for i in step] == sorted(lengths[i] for i in step)
    # A step mixes short and long rows as a random draw does (what length buckets did not).
    mixed = sum(lengths[step[0]] <= 70 < lengths[step[-1]] for step in steps)
    assert mixed > 0.8 * len(steps)


def test_sorted_micro_batches_carry_less_padding_than_random_ones():
    lengths = lengths_with_long_tail()
    sampler = SortedMicroBatchSampler(lengths, step_batch=32, seed=0)

    def padded(micro):
        return sum(max(lengths[i] for i in step[j:j + micro]) * len(step[j:j + micro])
                   for step in sampler.steps() for j in range(0, len(step), micro))

    assert padded(8) < 0.75 * padded(32)


def test_order_is_reproducible_and_changes_per_epoch_and_seed():
    lengths = [random.Random(i).randint(10, 90) for i in range(300)]
    a, b = SortedMicroBatchSampler(lengths, 16, seed=0), SortedMicroBatchSampler(lengths, 16, seed=0)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(a) != list(SortedMicroBatchSampler(lengths, 16, seed=1))
