"""Several datasets in one epoch, each with a weight and a number of repeats."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from diffcore.data.sampler import hash_seed


class MixDataset:
    """Datasets concatenated into one index space.

    Dataset ``k`` contributes ``round(len_k * repeats_k * weight_k)`` indices per epoch, cycling
    through its examples in a seeded order (so a fractional weight draws a seeded subset, the same
    every epoch, which keeps each index's bucket fixed). Buckets stay those of the inner datasets;
    when the inner datasets yield different fields, the field set joins the bucket key so a batch
    never mixes them.
    """

    def __init__(
        self,
        datasets: list[Any],
        weights: list[float],
        repeats: list[int],
        *,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        self.datasets = list(datasets)
        self.cache_dir = cache_dir
        owners, inner = [], []
        self.counts: list[int] = []
        for k, (ds, weight, rep) in enumerate(zip(self.datasets, weights, repeats)):
            n = len(ds)
            count = round(n * rep * weight)
            order = list(range(n))
            random.Random(hash_seed(seed, k)).shuffle(order)
            owners.append(np.full(count, k, dtype=np.int64))
            inner.append(np.asarray([order[j % n] for j in range(count)], dtype=np.int64))
            self.counts.append(count)
        self._owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        self._inner = np.concatenate(inner) if inner else np.zeros(0, dtype=np.int64)
        signatures = {tuple(sorted(getattr(ds, "fields", ()))) for ds in self.datasets}
        self._tag_fields = len(signatures) > 1
        names = {tuple(ds.class_names) for ds in self.datasets if getattr(ds, "class_names", None)}
        self.class_names = list(next(iter(names))) if len(names) == 1 else None
        self.fields = set().union(*(getattr(ds, "fields", set()) for ds in self.datasets))

    def __len__(self) -> int:
        return len(self._owner)

    def _locate(self, index: int) -> tuple[Any, int]:
        return self.datasets[int(self._owner[index])], int(self._inner[index])

    def bucket(self, index: int) -> Any:
        ds, j = self._locate(index)
        key = ds.bucket(j) if hasattr(ds, "bucket") else None
        if self._tag_fields:
            return key, tuple(sorted(getattr(ds, "fields", ())))
        return key

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets:
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def resolve(self, index: int) -> tuple[Any, int, int]:
        ds, j = self._locate(index)
        if hasattr(ds, "resolve"):
            leaf, j, _ = ds.resolve(j)
            return leaf, j, index
        return ds, j, index

    def example(
        self, index: int, key: int | None = None, *, epoch: int | None = None, pixels: bool = True
    ) -> dict[str, Any]:
        leaf, j, own = self.resolve(index)
        if hasattr(leaf, "example"):
            return leaf.example(j, own if key is None else key, epoch=epoch, pixels=pixels)
        if epoch is not None:
            from diffcore.data.sampler import EpochIndex

            return leaf[EpochIndex(j, epoch)]
        return leaf[j]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(int(index), epoch=getattr(index, "epoch", None))

    @property
    def problems(self) -> list[Any]:
        return [p for ds in self.datasets for p in getattr(ds, "problems", [])]
