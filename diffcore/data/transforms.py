"""Per-example random choices, drawn as a pure function of (seed, epoch, index).

Everything random about an example (crop offset, flip, caption dropout, tag order) comes from one
generator seeded by those three numbers, so a resumed run or another rank gets the same example.
"""

from __future__ import annotations

import random

import attrs

from diffcore.data.sampler import hash_seed


@attrs.frozen
class Draw:
    """The random choices for one example in one epoch."""

    top: int
    left: int
    flip: bool
    caption: str | None


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, keeping the first ``keep`` in place."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def draw(
    seed: int,
    epoch: int,
    index: int,
    *,
    slack: tuple[int, int],
    random_crop: bool,
    flip: float,
    caption: str | None,
    caption_dropout: float,
    tags: bool,
    keep_tags: int,
) -> Draw:
    """The choices for example ``index`` of ``epoch``; ``slack`` is the (rows, cols) the crop removes."""
    rng = random.Random(hash_seed(seed, epoch, index))
    # Always consume the same numbers in the same order so that one option never shifts another.
    r_top, r_left, r_flip, r_drop = rng.random(), rng.random(), rng.random(), rng.random()
    if random_crop:
        top, left = int(r_top * (slack[0] + 1)), int(r_left * (slack[1] + 1))
    else:
        top, left = slack[0] // 2, slack[1] // 2
    if caption is not None:
        if tags:
            caption = shuffle_tags(caption, keep_tags, rng)
        if r_drop < caption_dropout:
            caption = ""
    return Draw(top, left, r_flip < flip, caption)
