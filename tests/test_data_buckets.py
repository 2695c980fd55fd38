"""Aspect-ratio buckets and batching: no upscaling, crop bound, unmixed batches, rank sharding, resume."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.api import build_component
from diffcore.data.buckets import bucket_grid, nearest_bucket, place
from diffcore.data.collate import collate
from diffcore.data.sampler import BucketBatchSampler, EpochIndex
from diffcore.data.transforms import shuffle_tags

SIZES = [(w, h) for w in (40, 64, 100, 150, 300, 640, 1000) for h in (48, 64, 130, 256, 700)]


def draw_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_bucket_grid_respects_budget_step_and_sides():
    buckets = bucket_grid(512, 64, 256, 1024)
    assert (512, 512) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 256 <= h <= 1024 and 256 <= w <= 1024
        assert h * w <= 512 * 512
        assert (w, h) in buckets  # portrait and landscape alike
        # the largest height for its width, or (mirrored) the largest width for its height
        assert (h + 64) * w > 512 * 512 or h + 64 > 1024 or (w + 64) * h > 512 * 512 or w + 64 > 1024


@pytest.mark.parametrize("allow_upscale", [False, True])
def test_placement_never_upscales_and_crops_only_what_the_bucket_demands(allow_upscale):
    res, step, lo, hi = 128, 16, 64, 256
    buckets = bucket_grid(res, step, lo, hi)
    for w, h in SIZES:
        p = place(h, w, buckets, step=step, min_side=lo, budget=res * res, allow_upscale=allow_upscale)
        if isinstance(p, str):
            assert not allow_upscale and "below the minimum size" in p
            assert min(h, w) < lo  # only images too small for any bucket are refused
            continue
        (bh, bw), (rh, rw) = p.bucket, p.resized
        # covers the bucket: one side fits exactly, the other is at least as long
        assert rh >= bh and rw >= bw and (rh == bh or rw == bw)
        if not allow_upscale:
            assert rh <= h and rw <= w, f"{w}x{h} upscaled to {rw}x{rh}"
        if p.bucket in buckets:
            # nearest aspect ratio: no bucket of the grid would crop less
            assert p.bucket == nearest_bucket(h, w, buckets)
            kept = (bh * bw) / (rh * rw)
            mismatch = min((w / h) / (bw / bh), (bw / bh) / (w / h))
            assert kept == pytest.approx(mismatch, abs=0.03)
        else:  # its own smaller bucket: less than one step cropped per side
            assert not allow_upscale
            assert bh % step == 0 and bw % step == 0 and bh * bw <= res * res
            assert rh - bh < step and rw - bw < step


def test_upscale_only_when_allowed():
    buckets = bucket_grid(128, 16, 64, 256)
    p = place(70, 70, buckets, step=16, min_side=64, budget=128 * 128, allow_upscale=False)
    assert p.bucket == (64, 64) and p.resized == (64, 64)
    p = place(70, 70, buckets, step=16, min_side=64, budget=128 * 128, allow_upscale=True)
    assert p.bucket == (128, 128) and p.resized == (128, 128)
    # without buckets, a small image is refused unless upscaling is on
    assert "allow_upscale" in place(
        70, 70, [(128, 128)], step=16, min_side=128, budget=128 * 128, allow_upscale=False
    )


@pytest.fixture
def mixed_folder(tmp_path):
    """24 images in three aspect groups (8 each), captions with tags."""
    shapes = [(96, 96), (128, 64), (64, 128)]
    n = 0
    for w, h in shapes:
        for k in range(8):
            draw_image(tmp_path / f"{n:03d}.png", w + k, h + k, seed=n)
            (tmp_path / f"{n:03d}.txt").write_text(f"photo of sks, tag{n}, red, blue, green")
            n += 1
    return tmp_path


def make(folder: Path, **options) -> object:
    base = {"path": str(folder), "resolution": 96, "bucket_step": 16, "min_side": 32, "max_side": 192}
    return build_component("dataset", "folder", {**base, **options})


def test_batches_never_mix_buckets(mixed_folder):
    ds = make(mixed_folder, crop="random", flip=0.5)
    assert len({ds.bucket(i) for i in range(len(ds))}) == 3
    sampler = BucketBatchSampler(ds, 4, seed=1)
    for batch in itertools.islice(iter(sampler), 2 * len(sampler)):
        assert len({ds.bucket(i) for i in batch}) == 1
        out = collate([ds[i] for i in batch])  # equal shapes, or stacking fails
        assert out["pixels"].shape[0] == 4


def test_rank_sharding_covers_each_example_once_per_epoch(mixed_folder):
    ds = make(mixed_folder)
    world = 2
    samplers = [BucketBatchSampler(ds, 2, seed=5, rank=r, world_size=world) for r in range(world)]
    per_epoch = len(samplers[0])
    for epoch in range(2):
        seen = []
        streams = [itertools.islice(iter(s), epoch * per_epoch, (epoch + 1) * per_epoch) for s in samplers]
        for steps in zip(*streams):
            # one global batch: every rank's slice comes from the same bucket
            assert len({ds.bucket(i) for batch in steps for i in batch}) == 1
            for batch in steps:
                assert {getattr(i, "epoch", 0) for i in batch} == {epoch}
                seen.extend(int(i) for i in batch)
        assert sorted(seen) == list(range(len(ds)))


def test_mid_epoch_resume_gives_the_same_next_batch(mixed_folder):
    options = {"crop": "random", "flip": 0.5, "caption_dropout": 0.3, "shuffle_tags": True, "keep_tags": 1}
    ds = make(mixed_folder, **options)
    sampler = BucketBatchSampler(ds, 4, seed=3)
    stream = iter(sampler)
    consumed = len(sampler) + 2  # into the second epoch
    for _ in range(consumed):
        next(stream)
    expected = next(stream)
    expected_items = [ds[i] for i in expected]

    # a new process: fresh dataset and sampler, position restored
    ds2 = make(mixed_folder, **options)
    resumed = BucketBatchSampler(ds2, 4, seed=3)
    resumed.load_state_dict({**sampler.state_dict(), "position": consumed})
    batch = next(iter(resumed))
    assert [int(i) for i in batch] == [int(i) for i in expected]
    for a, b in zip(expected_items, (ds2[i] for i in batch)):
        assert a["captions"] == b["captions"]
        torch.testing.assert_close(a["pixels"], b["pixels"])


def test_augmentations_are_a_function_of_seed_epoch_index(mixed_folder):
    options = {"crop": "random", "flip": 0.5, "caption_dropout": 0.2, "shuffle_tags": True, "keep_tags": 1}
    a, b = make(mixed_folder, **options), make(mixed_folder, **options)
    order = list(range(len(a)))
    random.Random(0).shuffle(order)
    for i in order:  # visiting order does not matter
        torch.testing.assert_close(a[EpochIndex(i, 4)]["pixels"], b[EpochIndex(i, 4)]["pixels"])
    b.set_epoch(4)  # set_epoch and EpochIndex agree
    assert all(a[EpochIndex(i, 4)]["captions"] == b[i]["captions"] for i in order)
    epochs = [[a[EpochIndex(i, e)]["captions"] for i in range(len(a))] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    for caption in itertools.chain(*epochs):
        assert caption == "" or caption.startswith("photo of sks, ")
    assert sum(c == "" for c in itertools.chain(*epochs)) > 0
    other_seed = make(mixed_folder, **options, seed=99)
    assert [other_seed[EpochIndex(i, 0)]["captions"] for i in range(len(a))] != epochs[0]


def test_shuffle_tags_keeps_the_first_n():
    rng = random.Random(0)
    tags = "a, b, c, d, e, f, g"
    outs = {shuffle_tags(tags, 2, rng) for _ in range(20)}
    assert len(outs) > 1
    for out in outs:
        parts = out.split(", ")
        assert parts[:2] == ["a", "b"] and sorted(parts) == list("abcdefg")


def test_center_crop_is_centred(tmp_path):
    # a 128x64 image (wide) in a square-only setup: the centre 64x64 is kept
    img = np.zeros((64, 128, 3), dtype=np.uint8)
    img[:, 32:96] = 255
    Image.fromarray(img).save(tmp_path / "w.png")
    (tmp_path / "w.txt").write_text("w")
    ds = build_component("dataset", "folder", {"path": str(tmp_path), "resolution": 64, "buckets": False})
    x = ds[0]["pixels"]
    assert x.shape == (3, 64, 64) and x.min() == 1.0
    assert math.isclose(float(x.mean()), 1.0)
