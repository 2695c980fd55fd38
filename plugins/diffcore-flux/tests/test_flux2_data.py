"""The metadata dataset's edit columns as Flux.2 training reads them: a ``reference`` list (batched per
position), a ``mask`` column, and clear errors for a mask or a reference that does not fit its image."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import diffcore
from diffcore.data.collate import collate
from diffcore.errors import UserError


def _write(root, rows, sizes):
    root.mkdir(exist_ok=True)
    for name, (w, h, mode) in sizes.items():
        Image.new(mode, (w, h), 255 if mode == "L" else "red").save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "metadata.jsonl"


def _dataset(file, **more):
    section = {"file": str(file), "resolution": 32, "buckets": False, "bucket_step": 16, **more}
    return diffcore.build_component("dataset", "metadata", section)


def test_reference_lists_and_masks_batch_per_position(tmp_path):
    sizes = {"a.png": (32, 32, "RGB"), "r1.png": (64, 64, "RGB"), "r2.png": (32, 32, "RGB"), "m.png": (32, 32, "L")}
    rows = [
        {"image": "a.png", "caption": "x", "reference": ["r1.png", "r2.png"], "mask": "m.png"},
        {"image": "a.png", "caption": "y", "reference": ["r2.png", "r1.png"]},
    ]
    dataset = _dataset(_write(tmp_path, rows, sizes))
    batch = collate([dataset[0], dataset[1]])
    assert isinstance(batch["reference"], list) and len(batch["reference"]) == 2
    assert [tuple(r.shape) for r in batch["reference"]] == [(2, 3, 32, 32)] * 2
    assert batch["mask"].shape == (2, 1, 32, 32)
    assert batch["mask"][0].min() == 1 and batch["mask"][1].min() == 1  # no mask file: all repainted


def test_a_single_reference_stays_a_tensor(tmp_path):
    sizes = {"a.png": (32, 32, "RGB"), "r.png": (32, 32, "RGB")}
    rows = [{"image": "a.png", "caption": "x", "reference": "r.png"}] * 2
    batch = collate([e for e in (_dataset(_write(tmp_path, rows, sizes))[i] for i in range(2))])
    assert isinstance(batch["reference"], torch.Tensor) and batch["reference"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"reference": "wide.png"}, r"reference 64x32 would be stretched to its image's 32x32"),
        ({"mask": "small.png"}, r"mask 16x16 does not match its image 32x32"),
    ],
    ids=["reference", "mask"],
)
def test_a_reference_or_mask_that_does_not_fit_is_a_user_error(tmp_path, row, message):
    sizes = {"a.png": (32, 32, "RGB"), "wide.png": (64, 32, "RGB"), "small.png": (16, 16, "L")}
    file = _write(tmp_path, [{"image": "a.png", "caption": "x", **row}], sizes)
    with pytest.raises(UserError, match=message):
        _dataset(file, on_bad_data="error")


def test_examples_with_different_reference_counts_are_a_user_error(tmp_path):
    sizes = {"a.png": (32, 32, "RGB"), "r.png": (32, 32, "RGB")}
    rows = [
        {"image": "a.png", "caption": "x", "reference": ["r.png", "r.png"]},
        {"image": "a.png", "caption": "y", "reference": ["r.png"]},
    ]
    with pytest.raises(UserError, match=r"different numbers of reference images \(1, 2\)"):
        _dataset(_write(tmp_path, rows, sizes))
