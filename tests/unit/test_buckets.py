"""Length-bucketed batches for SFT: least padding, every row once, mixed examples, reproducible order."""

import itertools
import random

from latentalign.sft.buckets import LengthBucketSampler, bucket_bounds


def padded(lengths, bounds):
    return sum(next(b for b in bounds if n <= b) for n in lengths)


def test_bounds_minimise_padding_exactly():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.choice([5, 9, 12, 30, 31, 60]) + rng.randint(0, 3) for _ in range(rng.randint(5, 40))]
        values = sorted(set(lengths))
        for k in (1, 2, 3):
            best = min(padded(lengths, sorted(set(cut) | {values[-1]}))
                       for cut in itertools.combinations(values, min(k - 1, len(values) - 1)))
            bounds = bucket_bounds(lengths, k)
            assert len(bounds) <= k and bounds[-1] == max(lengths)
            assert padded(lengths, bounds) == best


def test_sampler_yields_every_row_once_in_batches_from_one_range():
    rng = random.Random(1)
    lengths = [rng.randint(40, 70) for _ in range(500)] + [rng.randint(100, 130) for _ in range(90)]
    rng.shuffle(lengths)
    sampler = LengthBucketSampler(lengths, batch_size=32, buckets=2, seed=3)
    assert sampler.bounds == [70, 130]
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    for batch in sampler.batches():
        assert len({lengths[i] <= 70 for i in batch}) == 1
    short = [b for b in sampler.batches() if lengths[b[0]] <= 70]
    assert len({lengths[i] for i in short[0]}) > 10, "a short batch mixes lengths (and so question types)"


def test_sampler_order_is_reproducible_and_changes_per_epoch():
    lengths = [random.Random(i).randint(10, 90) for i in range(300)]
    a, b = LengthBucketSampler(lengths, 16, seed=0), LengthBucketSampler(lengths, 16, seed=0)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(a) != list(LengthBucketSampler(lengths, 16, seed=1))
