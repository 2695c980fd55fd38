"""Resuming onto another global batch (another number of processes): the interrupted epoch is
re-cut so that no example of it is skipped or seen twice, and later epochs are the new size's own."""

import itertools
from collections import Counter

import pytest

from diffcore.data.sampler import BucketBatchSampler


class Buckets:
    """48 examples in two buckets of 24 (by parity), as an image dataset with two aspect buckets."""

    def __len__(self):
        return 48

    def bucket(self, index):
        return index % 2


def ranks(world, batch, position=0, state=None):
    samplers = [BucketBatchSampler(Buckets(), batch, seed=3, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
        s.position = position if state is None else s.position
    return samplers


def take(samplers, steps):
    """``steps`` global batches as each rank sees them (lists of example ids), joined across ranks."""
    streams = [iter(s) for s in samplers]
    out = []
    for _ in range(steps):
        batch = [int(i) for stream in streams for i in next(stream)]
        out.append(batch)
        for s in samplers:
            s.position += 1
    return out


@pytest.mark.parametrize(("old", "new"), [((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 4), (1, 4)), ((1, 4), (2, 2))])
def test_the_interrupted_epoch_is_completed_exactly_once(old, new):
    (old_world, old_batch), (new_world, new_batch) = old, new
    before = ranks(old_world, old_batch)
    per_epoch = before[0].batches_per_epoch
    done = take(before, per_epoch + 3)  # into the second epoch
    state = before[0].state_dict()
    after = ranks(new_world, new_batch, state=state)
    assert all(s.epoch_of(s.position) == 1 for s in after)
    rest = []
    while after[0].epoch_of(after[0].position) == 1:
        rest += take(after, 1)
    counts = Counter(itertools.chain(*done[per_epoch:], *rest))
    assert set(counts) == set(range(48))  # nothing skipped
    repeats = sum(n - 1 for n in counts.values())
    if new_world * new_batch <= old_world * old_batch:
        assert repeats == 0  # a smaller batch divides the old ones: every example exactly once
    else:
        # a bigger one: only each bucket's last, filled-up batch repeats examples
        assert repeats < 2 * new_world * new_batch
    # a batch never mixes buckets (one aspect per step), and the new batches have the new size
    assert all(len({i % 2 for i in b}) == 1 for b in rest)
    assert all(len(b) == new_world * new_batch for b in rest)
    # the next epoch is the new size's own, whatever came before
    fresh = ranks(new_world, new_batch)
    assert take(after, 2) == fresh[0].epoch_batches(2)[:2]


def test_resuming_again_inside_the_recut_epoch_continues_it():
    first = ranks(2, 2)
    take(first, 5)
    one = ranks(1, 2, state=first[0].state_dict())
    take(one, 3)
    state = one[0].state_dict()
    assert "transition" in state
    again = ranks(1, 2, state=state)
    assert take(again, 4) == take(one, 4)


def test_a_remainder_smaller_than_the_new_batch_is_filled_from_its_own_bucket():
    first = ranks(1, 2)
    take(first, 1)  # 2 of the 48 examples seen; one bucket has 22 left, 22 = 2 * 8 + 6
    grown = ranks(1, 8, state=first[0].state_dict())
    rest = []
    while grown[0].epoch_of(grown[0].position) == 0:
        rest += take(grown, 1)
    seen = Counter(itertools.chain(*rest))
    assert set(seen) | set(take(ranks(1, 2), 1)[0]) == set(range(48))
    assert sum(n - 1 for n in seen.values()) == 2  # only the 6-example remainder's batch repeats (2 slots)
