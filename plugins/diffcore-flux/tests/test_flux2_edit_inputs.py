"""What ``diffcore sample --reference/--mask`` and the sample callback hand the model
(diffcore.inputs.load_edit_inputs), for Flux.2 and for Flux.1 Kontext."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import diffcore
from diffcore.errors import UserError
from diffcore.inputs import load_edit_inputs


def _png(path, size, mode="RGB", fill="red"):
    Image.new(mode, size, 255 if mode == "L" else fill).save(path)
    return path


def test_references_and_mask_at_the_sample_size(tmp_path):
    a, b = _png(tmp_path / "a.png", (64, 32)), _png(tmp_path / "b.png", (32, 16), fill="blue")
    mask = _png(tmp_path / "m.png", (64, 32), "L")
    one = load_edit_inputs([a], None, count=3, height=16, width=32)
    assert isinstance(one["reference"], torch.Tensor) and one["reference"].shape == (3, 3, 16, 32)
    two = load_edit_inputs([a, b], mask, count=2, height=16, width=32)
    assert [r.shape for r in two["reference"]] == [(2, 3, 16, 32)] * 2
    assert two["reference"][1][0, 2].mean() > 0.9  # blue, in [-1, 1]
    assert two["mask"].shape == (2, 1, 16, 32) and two["mask"].min() == 1.0  # white = repaint, in [0, 1]


def test_a_stretched_reference_or_a_mismatched_mask_is_a_user_error(tmp_path):
    wide = _png(tmp_path / "wide.png", (64, 16))
    with pytest.raises(UserError, match="reference 1 is 64x16 pixels: it would be stretched to the 32x32 sample"):
        load_edit_inputs([wide], None, count=1, height=32, width=32)
    square = _png(tmp_path / "sq.png", (32, 32))
    small = _png(tmp_path / "small.png", (16, 16), "L")
    with pytest.raises(UserError, match="mask is 16x16 pixels but the image it edits .* is 32x32") as info:
        load_edit_inputs([square], small, count=1, height=32, width=32)
    assert info.value.where.startswith("--mask")


def test_flux1_kontext_samples_with_a_reference(tmp_path):
    pytest.importorskip("diffcore_vae")
    from _flux_tiny import AXES, LATENT_CHANNELS, write_pipeline

    from diffcore.sampling import generate

    write_pipeline(tmp_path / "flux", guidance=True)
    vae = dict(block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=LATENT_CHANNELS)
    model = diffcore.load_model("flux", pretrained=tmp_path / "flux", axes_dim=AXES, max_sequence_length=8,
                                kontext=True, vae_options=vae)  # fmt: skip
    scheduler = diffcore.load_scheduler(**model.default_scheduler)
    images = []
    for fill in ("red", "blue"):
        ref = _png(tmp_path / f"{fill}.png", (16, 16), fill=fill)
        batch = {"captions": ["a cat"], **load_edit_inputs([ref], None, count=1, height=16, width=16)}
        images.append(generate(model, scheduler, batch=batch, height=16, width=16, steps=2, seed=0))
    assert images[0].shape == (1, 3, 16, 16)
    assert (images[0] - images[1]).abs().max() > 1e-4  # the reference conditions the sample
