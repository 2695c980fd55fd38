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
        groups: dict[Any, list[int]] = {}
        for i in range(len(dataset)):
            groups.setdefault(_bucket_of(dataset, i), []).append(i)
        self._groups = [groups[k] for k in sorted(groups, key=repr)]
        self.batches_per_epoch = len(self.epoch_batches(0))
        if self.batches_per_epoch == 0:
            global_batch = batch_size * world_size
            raise ValueError(
                f"the dataset has {len(dataset)} examples, fewer than one global batch of {global_batch} "
                "in every bucket; lower train.batch_size or add data"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``, in order (every rank computes the same list)."""
        rng = random.Random(hash_seed(self.seed, epoch))
        batches: list[list[int]] = []
        size = self.global_batch
        for group in self._groups:
            order = list(group)
            if self.shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                if len(chunk) < size:
                    if self.drop_last:
                        continue
                    chunk = chunk + order[: size - len(chunk)]  # pad with the bucket's own examples
                batches.append(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def local(self, global_batch: Sequence[int]) -> list[int]:
        return list(global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def epoch_of(self, position: int) -> int:
        return position // self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        position = self.position
        while True:
            epoch, offset = divmod(position, self.batches_per_epoch)
            batches = self.epoch_batches(epoch)
            for global_batch in batches[offset:]:
                yield [EpochIndex(i, epoch) for i in self.local(global_batch)]
            position = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ValueError(
                f"cannot resume: the checkpoint was made with a global batch of {state['global_batch']} "
                f"examples, this run has {self.global_batch} (batch_size x processes)"
            )
        self.position = int(state["position"])


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
