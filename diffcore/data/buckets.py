"""Aspect-ratio buckets: which (height, width) each image is trained at, and how it gets there.

Buckets share a pixel budget (resolution squared) with sides in steps of ``step`` between
``min_side`` and ``max_side``. An image goes to the bucket nearest its aspect ratio (in log space)
and is scaled to *cover* it, so one side fits exactly and only the other is cropped: the crop is
no more than the aspect mismatch demands. An image smaller than that bucket is not scaled up (unless
allowed); it gets its own smaller bucket, its size rounded down to the step, which crops less than
one step per side.
"""

from __future__ import annotations

import math

import attrs

Bucket = tuple[int, int]  # (height, width) in pixels


@attrs.frozen
class Placement:
    """How one image becomes its bucket: scale to ``resized`` (h, w), then crop to ``bucket``."""

    bucket: Bucket
    resized: Bucket
    #: the image's own (height, width) as displayed, before scaling
    original: Bucket | None = None

    @property
    def slack(self) -> Bucket:
        """Rows and columns the crop removes."""
        return self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1]


def bucket_grid(resolution: int, step: int, min_side: int, max_side: int) -> list[Bucket]:
    """Every bucket of the budget ``resolution**2``: the largest height for each width, both ways."""
    budget = resolution * resolution
    out: set[Bucket] = set()
    for width in range(_ceil_to(min_side, step), max_side + 1, step):
        height = (budget // width) // step * step
        if min_side <= height <= max_side:
            out.add((height, width))
            out.add((width, height))
    if not out:
        raise ValueError(
            f"no bucket fits resolution {resolution} with sides in steps of {step} in [{min_side}, {max_side}]"
        )
    return sorted(out)


@attrs.frozen
class BucketSetup:
    """The buckets of a dataset's options, and the smallest side an image's own bucket may have."""

    buckets: list[Bucket]
    min_side: int
    max_side: int


class NoBucket(ValueError):
    """Options that make no bucket; the message says which keys and how to fix them."""


def bucket_setup(
    resolution: int, *, buckets: bool, step: int, min_side: int | None, max_side: int | None
) -> BucketSetup:
    """The buckets a dataset with these options trains at; raises :class:`NoBucket`.

    Without buckets every image is ``resolution`` square and ``step`` plays no part (it only shapes
    the aspect buckets), so any ``step`` goes with any resolution.
    """
    if resolution < 1:
        raise NoBucket(f"resolution must be at least 1, got {resolution}")
    if not buckets:
        return BucketSetup([(resolution, resolution)], resolution, resolution)
    if step < 8 or resolution < step:
        raise NoBucket(
            f"resolution {resolution} and bucket_step {step} do not make a bucket "
            f"(set bucket_step between 8 and {resolution}, or buckets: false)"
        )
    low = min_side or max(step, resolution // 2)
    high = max_side or resolution * 2
    try:
        grid = bucket_grid(resolution, step, low, high)
    except ValueError as exc:
        raise NoBucket(f"{exc} (check min_side, max_side and bucket_step)") from None
    return BucketSetup(grid, low, high)


def _ceil_to(value: int, step: int) -> int:
    return max(step, -(-value // step) * step)


def nearest_bucket(height: int, width: int, buckets: list[Bucket]) -> Bucket:
    """The bucket closest in log aspect ratio; ties go to the larger bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


def cover(height: int, width: int, bucket: Bucket) -> Placement:
    """Scale (height, width) to cover ``bucket``: one side equal, the other at least as long."""
    scale = max(bucket[0] / height, bucket[1] / width)
    resized = (max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale)))
    return Placement(bucket, resized, (height, width))


def place(
    height: int,
    width: int,
    buckets: list[Bucket],
    *,
    step: int,
    min_side: int,
    budget: int,
    allow_upscale: bool,
) -> Placement | str:
    """The placement of an image of (height, width), or why it cannot be used (a sentence)."""
    bucket = nearest_bucket(height, width, buckets)
    if allow_upscale or (height >= bucket[0] and width >= bucket[1]):
        return cover(height, width, bucket)
    if len(buckets) == 1:
        return (
            f"image is {width}x{height}, smaller than {bucket[1]}x{bucket[0]} "
            "(set allow_upscale: true to scale it up)"
        )
    # Too small for its bucket: its own bucket, rounded down to the step (never scaled up).
    shrink = min(1.0, math.sqrt(budget / (height * width)))
    own = (int(height * shrink) // step * step, int(width * shrink) // step * step)
    if min(own) < min_side:
        return f"image is {width}x{height}, below the minimum size (bucket sides of at least {min_side})"
    return cover(height, width, own)
