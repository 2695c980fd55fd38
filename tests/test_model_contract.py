"""Defaults of the model contract (diffcore.model.DiffusionModel) that plugins rely on."""

from __future__ import annotations

import pytest
import torch

from diffcore.errors import UserError
from diffcore.model import DiffusionModel


class LatentModel(DiffusionModel):
    autoencoder_hint = "set vae to the autoencoder's file"


def test_pixel_space_model_passes_pixels_through() -> None:
    model = DiffusionModel(torch.nn.Linear(2, 2), latent_channels=3)
    pixels = torch.rand(1, 3, 4, 4)
    assert model.encode_images(pixels) is pixels and model.decode_latents(pixels) is pixels


def test_latent_model_without_its_autoencoder_refuses_to_treat_pixels_as_latents() -> None:
    model = LatentModel(torch.nn.Linear(2, 2), latent_channels=16)
    model.architecture = "toy"
    for call in (model.encode_images, model.decode_latents):
        with pytest.raises(UserError, match="this toy model has no autoencoder loaded") as caught:
            call(torch.rand(1, 3, 8, 8))
        assert caught.value.where == "$.model.vae" and caught.value.hint == "set vae to the autoencoder's file"
