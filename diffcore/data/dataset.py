"""The map-style image dataset behind "folder" and "metadata": checks, buckets and transforms."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from diffcore.data.buckets import Bucket, NoBucket, Placement, bucket_setup, place
from diffcore.data.config import ImageOptions
from diffcore.data.images import BadImage, fit, load
from diffcore.data.sizes import SizeMemo
from diffcore.data.sources import Listing, Record
from diffcore.data.transforms import Draw, draw
from diffcore.errors import UserError

log = logging.getLogger("diffcore.data")

#: how many problem paths a report names
SHOWN = 5


@attrs.frozen
class DataProblem:
    """One example left out: its file and why."""

    path: str
    reason: str


def report(problems: list[DataProblem], total: int, where: str) -> str:
    """One message: how many were skipped, the first few paths and why."""
    return f"{where}: skipped {len(problems)} of {total} examples ({_reasons(problems)})"


def _reasons(problems: list[DataProblem]) -> str:
    shown = "; ".join(f"{p.path}: {p.reason}" for p in problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return f"{shown}{more}"


def references(record: Record) -> tuple[Path, ...]:
    """A record's reference images in order (none, one or several)."""
    if record.reference is None:
        return ()
    return record.reference if isinstance(record.reference, tuple) else (record.reference,)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC (or HW) -> float CHW in [-1, 1] (or 1HW in [0, 1] for masks)."""
    # numpy, single-threaded: torch's elementwise ops on small images in loader workers cost more in
    # thread-pool wake-ups than in arithmetic.
    if array.ndim == 2:
        out = array[None].astype(np.float32)
        out *= 1.0 / 255.0
    else:
        out = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
        out *= 1.0 / 127.5
        out -= 1.0
    return torch.from_numpy(out)


class ImageDataset:
    """Examples listed by a source, checked at construction, bucketed and transformed on load.

    ``problems`` lists what was left out (or, with ``on_bad_data: error``, construction raises a
    :class:`UserError` naming the first bad file). An image that passes the start-up check but fails
    to decode later is, under "skip", replaced by another example of its bucket and reported once.
    """

    def __init__(self, listing: Listing, options: ImageOptions, *, where: str = "$.data"):
        self.options = options
        self.where = where
        self.class_names = listing.class_names
        self.cache_dir = options.cache_dir
        self.epoch = 0
        try:
            setup = bucket_setup(
                options.resolution, buckets=options.buckets, step=options.bucket_step,
                min_side=options.min_side, max_side=options.max_side,
            )  # fmt: skip
        except NoBucket as exc:
            raise UserError(str(exc), where=where) from None
        self.min_side, self.max_side, self.buckets = setup.min_side, setup.max_side, setup.buckets
        problems = [DataProblem(path, why) for path, why in listing.problems]
        checked = self._scan(listing.records)
        self.records: list[Record] = []
        self.placements: list[Placement] = []
        for record, result in zip(listing.records, checked):
            if isinstance(result, DataProblem):
                problems.append(result)
            else:
                self.records.append(record)
                self.placements.append(result)
        self.problems: list[DataProblem] = problems
        total = len(listing.records) + len(listing.problems)
        if problems and options.on_bad_data == "error":
            first = problems[0]
            others = f" ({len(problems) - 1} other bad examples)" if len(problems) > 1 else ""
            raise UserError(
                f"bad example: {first.reason}{others}",
                where=first.path,
                hint=f"fix or remove it, or set {where}.on_bad_data: skip",
            )
        if not self.records:
            # the reasons in the one message (a warning line before it would make two)
            raise UserError(
                f"no usable examples (of {total})" + (f": {_reasons(problems)}" if problems else ""),
                where=where,
                hint="check the path and the files",
            )
        if problems:
            log.warning(report(problems, total, where))
        self.fields = self._fields()
        self._by_bucket: dict[Bucket, list[int]] = {}
        self._slot: list[int] = []  # position of each example in its bucket's list
        for i, p in enumerate(self.placements):
            members = self._by_bucket.setdefault(p.bucket, [])
            self._slot.append(len(members))
            members.append(i)
        self._reported: set[str] = set()

    # -- checks at start -------------------------------------------------------------------------
    def _scan(self, records: list[Record]) -> list[Placement | DataProblem]:
        cache_dir = self.options.cache_dir
        self._sizes = SizeMemo(Path(cache_dir).expanduser() / "image-sizes.json" if cache_dir else None)
        workers = max(1, min(self.options.scan_workers, len(records)))
        if workers == 1:
            checked = [self._check(r) for r in records]
        else:
            with ThreadPoolExecutor(workers) as pool:
                checked = list(pool.map(self._check, records))
        self._sizes.save()
        del self._sizes
        return checked

    def _check(self, record: Record) -> Placement | DataProblem:
        decode = self.options.scan == "decode"
        try:
            height, width = self._sizes.probe(record.image, decode=decode)
            extras = [("mask", record.mask), ("control", record.control)]
            extras += [("reference", path) for path in references(record)]
            sizes = [(name, path, self._sizes.probe(path, decode=decode)) for name, path in extras if path is not None]
        except BadImage as exc:
            return DataProblem(str(record.image), str(exc))
        opts = self.options
        placement = place(
            height,
            width,
            self.buckets,
            step=opts.bucket_step,
            min_side=self.min_side if opts.buckets else opts.resolution,
            budget=opts.resolution**2,
            allow_upscale=opts.allow_upscale,
        )
        if isinstance(placement, str):
            return DataProblem(str(record.image), placement)
        for name, path, (h, w) in sizes:
            if name == "mask" and (h, w) != (height, width):
                return DataProblem(str(path), f"mask {w}x{h} does not match its image {width}x{height}")
            # a reference is resized with its image: one of another aspect would be stretched
            stretch = abs(w * placement.resized[0] / h - placement.resized[1])
            if name == "reference" and stretch > opts.bucket_step:
                return DataProblem(
                    str(path),
                    f"reference {w}x{h} would be stretched to its image's {placement.resized[1]}x"
                    f"{placement.resized[0]} (bucket {placement.bucket[1]}x{placement.bucket[0]}): crop it to "
                    f"the image's aspect ratio",
                )
        return placement

    def _fields(self) -> set[str]:
        fields = {"pixels"}
        if any(r.caption is not None for r in self.records):
            fields.add("captions")
        if all(r.label is not None for r in self.records):
            fields.add("labels")
        for name in ("mask", "control", "reference"):
            if any(getattr(r, name) is not None for r in self.records):
                fields.add(name)
        for name in ("control", "reference"):
            missing = [r for r in self.records if name in fields and getattr(r, name) is None]
            if missing:
                raise UserError(
                    f"{len(missing)} examples have no {name} image while others do (first: {missing[0].origin or missing[0].image})",
                    where=self.where,
                )
        counts = {len(references(r)) for r in self.records}
        if any(isinstance(r.reference, tuple) for r in self.records):
            if len(counts) > 1:  # a batch stacks each reference position
                raise UserError(
                    f"examples list different numbers of reference images ({', '.join(map(str, sorted(counts)))})",
                    where=self.where,
                    hint="give every example the same number of references",
                )
            self.records = [
                attrs.evolve(r, reference=references(r)) if not isinstance(r.reference, tuple) else r
                for r in self.records
            ]
        return fields

    # -- the Dataset protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def bucket(self, index: int) -> Bucket:
        return self.placements[index].bucket

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resolve(self, index: int) -> tuple[ImageDataset, int, int]:
        """(the dataset that holds the example, its index there, the key its random draws use)."""
        return self, index, index

    def draw(self, index: int, key: int | None = None, epoch: int | None = None) -> Draw:
        """The random choices for example ``index`` in ``epoch`` (default: the one set by
        ``set_epoch``), drawn with ``key`` (default ``index``)."""
        opts = self.options
        return draw(
            opts.seed,
            self.epoch if epoch is None else epoch,
            index if key is None else key,
            slack=self.placements[index].slack,
            random_crop=opts.crop == "random",
            flip=opts.flip,
            caption=self.records[index].caption if "captions" in self.fields else None,
            caption_dropout=opts.caption_dropout,
            tags=opts.shuffle_tags,
            keep_tags=opts.keep_tags,
        )

    def render(
        self, index: int, choice: Draw, *, pixels: bool = True, only_pixels: bool = False
    ) -> dict[str, Any]:
        """Example ``index`` under ``choice``; ``pixels=False`` leaves out the main image (cached)."""
        record, placement = self.records[index], self.placements[index]
        geometry = (placement.resized, choice.top, choice.left, placement.bucket, choice.flip)
        out: dict[str, Any] = {}
        if pixels:
            out["pixels"] = to_tensor(fit(load(record.image, "RGB"), *geometry))
            if only_pixels:
                return out
        if "captions" in self.fields:
            out["captions"] = choice.caption or ""
        if "labels" in self.fields:
            assert record.label is not None  # a field only when every record has a label
            out["labels"] = int(record.label)
        if "mask" in self.fields:
            if record.mask is None:
                out["mask"] = torch.ones(1, *placement.bucket)
            else:
                out["mask"] = to_tensor(fit(load(record.mask, "L"), *geometry))
        for name in ("control", "reference"):
            if name not in self.fields:
                continue
            value = getattr(record, name)
            if isinstance(value, tuple):  # several references: a list, stacked per position by collate
                out[name] = [to_tensor(fit(load(path, "RGB"), *geometry)) for path in value]
            else:
                out[name] = to_tensor(fit(load(value, "RGB"), *geometry))
        return out

    def example(
        self, index: int, key: int | None = None, *, epoch: int | None = None, pixels: bool = True
    ) -> dict[str, Any]:
        """Example ``index`` drawn with ``key``; a file that fails to load is handled per on_bad_data."""
        for candidate in self.same_bucket(index):
            try:
                return self.render(
                    candidate, self.draw(candidate, key if key is not None else index, epoch), pixels=pixels
                )
            except BadImage as exc:
                self._failed(candidate, str(exc))
        raise UserError(
            f"no example of bucket {self.placements[index].bucket} could be loaded", where=self.where
        )

    def same_bucket(self, index: int) -> Iterator[int]:
        """``index``, then the other examples of its bucket in order (stand-ins for a bad file)."""
        order = self._by_bucket[self.placements[index].bucket]
        start = self._slot[index]
        return (order[(start + n) % len(order)] for n in range(len(order)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        # The sampler's EpochIndex carries the epoch, which survives the trip to worker processes.
        return self.example(int(index), epoch=getattr(index, "epoch", None))

    def _failed(self, index: int, reason: str) -> None:
        path = str(self.records[index].image)
        if self.options.on_bad_data == "error":
            raise UserError(
                f"cannot load image: {reason}",
                where=path,
                hint=f"fix or remove it, or set {self.where}.on_bad_data: skip",
            )
        if path not in self._reported:
            self._reported.add(path)
            self.problems.append(DataProblem(path, reason))
            log.warning(
                "%s: skipped %s at load time (%s); using another example of its bucket",
                self.where,
                path,
                reason,
            )
