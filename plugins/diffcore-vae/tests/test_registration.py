"""The families reach architecture plugins through the public API only."""

from __future__ import annotations

import torch

import diffcore
from diffcore.model import DiffusionModel
from diffcore.registry import get_registry
from diffcore.testing import assert_entry_points_light

FAMILIES = {
    "sd": (4, 0.18215, None),
    "sdxl": (4, 0.13025, None),
    "sd3": (16, 1.5305, 0.0609),
    "flux": (16, 0.3611, 0.1159),
}


def test_plugin_module_does_not_import_torch():
    assert assert_entry_points_light("diffcore-vae") == ["diffcore_vae.plugin"]


def test_every_family_is_registered_with_published_defaults():
    registry = get_registry()
    for family, (channels, scale, shift) in FAMILIES.items():
        config = registry.get("autoencoder", family).spec.config()
        assert (config.latent_channels, config.scaling_factor, config.shift_factor) == (
            channels,
            scale,
            shift,
        )
        assert config.block_out_channels == [128, 256, 512, 512]
    flux2 = registry.get("autoencoder", "flux2").spec.config()
    assert flux2.latent_channels == 32 and flux2.patch_size == [2, 2] and flux2.batch_norm_eps == 1e-4


def test_options_are_validated_like_a_job_section():
    import pytest

    with pytest.raises(diffcore.ConfigError, match="did you mean 'latent_channels'"):
        diffcore.load_autoencoder("sdxl", latent_chanels=4)


@torch.no_grad()
def test_model_protocol_encode_images_uses_the_autoencoder():
    ae = diffcore.load_autoencoder("flux", block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8)
    model = DiffusionModel(torch.nn.Linear(2, 2), autoencoder=ae)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert model.latent_channels == 16 and model.latent_downscale == 2
    torch.testing.assert_close(model.encode_images(x), ae.encode(x))
    z = model.encode_images(x)
    torch.testing.assert_close(model.decode_latents(z), ae.decode(z))
    assert not any(p.requires_grad for p in ae.module.parameters())
