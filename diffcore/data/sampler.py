"""Deterministic, rank-aware, resumable batching by bucket.

The order of an epoch is a pure function of (seed, epoch): indices are grouped by
``dataset.bucket(i)``, each bucket shuffled and cut into *global* batches of
``batch_size * world_size`` examples, and the global batches shuffled. Rank ``r`` takes slice
``r`` of every global batch, so one bucket fills a step on every rank, every example is seen once
per epoch across the ranks, and a run on N ranks sees the same examples per step as one rank with an
N-times larger batch. Position is a count of global batches, so resuming at any batch is exact.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from diffcore.errors import UserError


def _bucket_of(dataset: Any, index: int) -> Any:
    bucket = getattr(dataset, "bucket", None)
    return bucket(index) if bucket is not None else None


class BucketBatchSampler:
    """Yields this rank's micro-batches (lists of indices), epoch after epoch, from a position."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.position = 0  # global batches consumed since the start of training
        # after a resume onto another global batch size: the rest of the interrupted epoch, re-cut
        self._transition: _Transition | None = None
        groups: dict[Any, list[int]] = {}
        for i in range(len(dataset)):
            groups.setdefault(_bucket_of(dataset, i), []).append(i)
        self._groups = [groups[k] for k in sorted(groups, key=repr)]
        self.batches_per_epoch = len(self.epoch_batches(0))
        if self.batches_per_epoch == 0:
            largest = max((len(g) for g in self._groups), default=0)
            per = f" (the largest bucket has {largest})" if len(self._groups) > 1 else ""
            raise UserError(
                f"the dataset has {len(dataset)} examples{per}, fewer than one global batch of {self.global_batch} "
                f"(batch_size {batch_size} x {world_size} processes)",
                where="$.train.batch_size",
                hint="lower train.batch_size, add data, or set train.drop_last: false to fill the batch by repeating examples",
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def epoch_batches(self, epoch: int, size: int | None = None) -> list[list[int]]:
        """The global batches of ``epoch``, in order (every rank computes the same list); ``size``:
        another global batch size than this sampler's."""
        rng = random.Random(hash_seed(self.seed, epoch))
        batches: list[list[int]] = []
        size = size or self.global_batch
        for group in self._groups:
            order = list(group)
            if self.shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                if len(chunk) < size:
                    if self.drop_last:
                        continue
                    # pad with the bucket's own examples, cycling when the bucket is smaller than a batch
                    chunk = chunk + [order[i % len(order)] for i in range(size - len(chunk))]
                batches.append(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def local(self, global_batch: Sequence[int]) -> list[int]:
        return list(global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def _locate(self, position: int, size: int, transition: _Transition | None) -> tuple[int, list[list[int]]]:
        """(epoch, the global batches of that epoch still to come) at ``position`` for batches of ``size``."""
        if transition is not None and position >= transition.start:
            into = position - transition.start
            if into < len(transition.batches):
                return transition.epoch, transition.batches[into:]
            per_epoch = len(self.epoch_batches(0, size))
            epoch, offset = divmod(into - len(transition.batches), per_epoch)
            epoch += transition.epoch + 1
        else:
            epoch, offset = divmod(position, len(self.epoch_batches(0, size)))
        return epoch, self.epoch_batches(epoch, size)[offset:]

    def epoch_of(self, position: int) -> int:
        t = self._transition
        if t is None or position < t.start:
            return position // self.batches_per_epoch
        into = position - t.start - len(t.batches)
        return t.epoch if into < 0 else t.epoch + 1 + into // self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batches = self._locate(self.position, self.global_batch, self._transition)
        while True:
            for global_batch in batches:
                yield [EpochIndex(i, epoch) for i in self.local(global_batch)]
            epoch += 1
            batches = self.epoch_batches(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"position": self.position, "seed": self.seed, "global_batch": self.global_batch}
        t = self._transition
        if t is not None and self.position < t.start + len(t.batches):
            state["transition"] = {"epoch": t.epoch, "start": t.start, "batches": t.batches}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. Written with another global batch size (another number of
        processes or batch_size), the rest of the interrupted epoch is re-cut into batches of this
        size: within each bucket, in the order they would have come, so no example of the epoch is
        skipped or seen twice. Only when the batch grows can a bucket's remainder be smaller than one
        new batch: that one batch is filled up by repeating the remainder's own examples."""
        self.position = int(state["position"])
        saved = state.get("transition")
        transition = _Transition(int(saved["epoch"]), int(saved["start"]), saved["batches"]) if saved else None
        size = int(state.get("global_batch", self.global_batch))
        if size == self.global_batch:
            self._transition = transition
            return
        epoch, remaining = self._locate(self.position, size, transition)
        self._transition = _Transition(epoch, self.position, self._recut(remaining))

    def _recut(self, batches: list[list[int]]) -> list[list[int]]:
        size = self.global_batch
        pending: dict[Any, list[int]] = {}
        out: list[list[int]] = []
        for batch in batches:
            for index in batch:
                group = pending.setdefault(_bucket_of(self.dataset, index), [])
                group.append(index)
                if len(group) == size:
                    out.append(list(group))
                    group.clear()
        for group in pending.values():
            if group:
                out.append(group + [group[i % len(group)] for i in range(size - len(group))])
        return out


@attrs.frozen
class _Transition:
    """The rest of epoch ``epoch`` re-cut to this run's global batch, from position ``start`` on."""

    epoch: int
    start: int
    batches: list[list[int]]


class EpochIndex(int):
    """An example index that also says which epoch asked for it.

    Datasets whose augmentations are random read ``getattr(index, "epoch", 0)`` to seed them from
    (seed, epoch, index); the value survives the trip to DataLoader worker processes.
    """

    epoch: int

    def __new__(cls, index: int, epoch: int = 0) -> EpochIndex:
        obj = super().__new__(cls, index)
        obj.epoch = epoch
        return obj

    def __reduce__(self):
        return (EpochIndex, (int(self), self.epoch))


def hash_seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (splitmix64 steps), stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF
