"""The built-in synthetic dataset: deterministic labelled shapes, and the classifier that reads them."""

from __future__ import annotations

import pytest
import torch

import diffcore
from diffcore.data.synthetic import classify
from diffcore.data.synthetic_config import CATALOGUE, SyntheticConfig
from diffcore.errors import ConfigError, UserError

ALL = [name for name, _, _ in CATALOGUE]


def build(**options):
    return diffcore.build_component("dataset", "synthetic", options)


def test_items_are_labelled_images_in_range():
    ds = build(resolution=24, size=10)
    assert len(ds) == 10
    assert ds.class_names == ["red circle", "green square", "blue triangle", "yellow cross"]
    item = ds[6]
    assert item["pixels"].shape == (3, 24, 24) and item["pixels"].dtype == torch.float32
    assert -1 <= item["pixels"].min() and item["pixels"].max() <= 1
    assert item["labels"] == 2 and item["captions"] == "a blue triangle"
    with pytest.raises(IndexError):
        ds[10]


def test_items_are_a_function_of_seed_and_index():
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    assert torch.equal(a[17]["pixels"], b[17]["pixels"])
    assert not torch.equal(a[17]["pixels"], c[17]["pixels"])
    assert not torch.equal(a[17]["pixels"], a[21]["pixels"])  # same class, different draw


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_classifier_reads_back_every_class(resolution):
    ds = build(resolution=resolution, size=120, classes=ALL)
    pixels = torch.stack([ds[i]["pixels"] for i in range(len(ds))])
    labels = torch.tensor([ds[i]["labels"] for i in range(len(ds))])
    for check_form in (False, True):
        measured = classify(pixels, ds.class_names, check_form=check_form)
        assert (measured == labels).float().mean().item() >= 0.99


def test_classifier_sees_no_class_in_noise_or_blank_images():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
    gauss = torch.randn(16, 3, 32, 32, generator=g).clamp(-1, 1)
    blank = torch.full((4, 3, 32, 32), -0.9)
    grey = torch.zeros(4, 3, 32, 32)
    for images in (noise, gauss, blank, grey):
        assert (classify(images, ALL) == -1).all()
        assert (classify(images, ALL, check_form=True) == -1).all()


def test_classifier_checks_the_form():
    ds = build(resolution=32, size=8, classes=ALL)
    square = ds[1]["pixels"]  # green square
    assert classify(square, ALL, check_form=True).item() == 1
    # the same colour drawn as a thin stripe is not a square
    stripe = torch.full_like(square, -0.8)
    stripe[1, 4:28, 14:18] = 0.9
    assert classify(stripe, ALL, check_form=True).item() == -1
    assert classify(stripe, ALL).item() == 1  # by colour alone it is the green class


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="unknown synthetic class 'purple star'"):
        build(classes=["red circle", "purple star"])
    with pytest.raises(ConfigError, match="resolutoin"):
        build(resolutoin=32)
    assert SyntheticConfig().class_names() == ALL[:4]


def test_classifier_defaults_to_the_default_classes():
    ds = build(size=8)
    pixels = torch.stack([ds[i]["pixels"] for i in range(8)])
    assert classify(pixels).tolist() == [ds[i]["labels"] for i in range(8)]
