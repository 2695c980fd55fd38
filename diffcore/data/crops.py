"""What bucketing does to a dataset's images, read from the placements the dataset itself computed:
which bucket each image trains at, and how many are cropped, downscaled, upscaled or skipped."""

from __future__ import annotations

from typing import Any

import attrs

from diffcore.data.buckets import Bucket, Placement


@attrs.frozen
class ImageFit:
    """One image's way into its bucket."""

    path: str
    original: Bucket  # (height, width)
    resized: Bucket
    bucket: Bucket

    @property
    def cropped(self) -> bool:
        return self.resized != self.bucket

    @property
    def crop_ratio(self) -> float:
        """The share of the scaled image's area the crop cuts away (0 when nothing is cut)."""
        return 1.0 - (self.bucket[0] * self.bucket[1]) / (self.resized[0] * self.resized[1])

    @property
    def scale(self) -> float:
        return self.resized[0] / self.original[0]


@attrs.frozen
class BucketRow:
    bucket: Bucket
    images: int
    cropped: int
    downscaled: int
    upscaled: int
    worst_crop: float


@attrs.frozen
class CropReport:
    """Per-image fits (images read from files) and a table per bucket (every dataset)."""

    fits: list[ImageFit]
    rows: list[BucketRow]
    examples: int
    skipped: list[tuple[str, str]]  # (path, why)

    @property
    def worst(self) -> ImageFit | None:
        return max(self.fits, key=lambda f: f.crop_ratio, default=None)

    def count(self, what: str) -> int:
        return sum(getattr(r, what) for r in self.rows)


def crop_report(dataset: Any) -> CropReport:
    """The report of a built dataset (a mix reports its image datasets' examples once each)."""
    leaves = image_datasets(dataset)
    fits: list[ImageFit] = []
    counts: dict[Bucket, int] = {}
    skipped: list[tuple[str, str]] = []
    if leaves is None:  # examples that are not image files (synthetic): only their buckets
        for bucket in buckets_of(dataset):
            counts[bucket] = counts.get(bucket, 0) + 1
    else:
        for leaf in leaves:
            for record, placement in zip(leaf.records, leaf.placements):
                fits.append(_fit(str(record.image), placement))
            skipped += [(p.path, p.reason) for p in leaf.problems]
    by_bucket: dict[Bucket, list[ImageFit]] = {}
    for fit in fits:
        by_bucket.setdefault(fit.bucket, []).append(fit)
    rows = [
        BucketRow(
            bucket=b,
            images=len(members),
            cropped=sum(f.cropped for f in members),
            downscaled=sum(f.scale < 1 for f in members),
            upscaled=sum(f.scale > 1 for f in members),
            worst_crop=max(f.crop_ratio for f in members),
        )
        for b, members in by_bucket.items()
    ]
    rows += [BucketRow(b, n, 0, 0, 0, 0.0) for b, n in counts.items()]
    rows.sort(key=lambda r: (-r.images, r.bucket))
    return CropReport(fits, rows, len(fits) if leaves is not None else sum(counts.values()), skipped)


def buckets_of(dataset: Any) -> list[Bucket]:
    """The (height, width) every example trains at. ``bucket(i)`` is optional in the dataset
    protocol: without it every example has the first one's size (one group, as the sampler sees it)."""
    bucket = getattr(dataset, "bucket", None)
    if bucket is not None:
        return [_pair(bucket(i)) for i in range(len(dataset))]
    if len(dataset) == 0:
        return []
    return [_pair(tuple(dataset[0]["pixels"].shape[-2:]))] * len(dataset)


def _pair(value: Any) -> Bucket:
    height, width = value
    return int(height), int(width)


def _fit(path: str, placement: Placement) -> ImageFit:
    assert placement.original is not None  # every placement comes from buckets.cover
    return ImageFit(path, placement.original, placement.resized, placement.bucket)


def image_datasets(dataset: Any) -> list[Any] | None:
    """The image datasets behind ``dataset`` (each once), or None when it is not made of image files."""
    from diffcore.data.dataset import ImageDataset
    from diffcore.data.mix import MixDataset

    if isinstance(dataset, ImageDataset):
        return [dataset]
    if isinstance(dataset, MixDataset):
        out: list[Any] = []
        for inner in dataset.datasets:
            found = image_datasets(inner)
            if found is None:
                return None
            out += [leaf for leaf in found if all(leaf is not seen for seen in out)]
        return out
    return None
