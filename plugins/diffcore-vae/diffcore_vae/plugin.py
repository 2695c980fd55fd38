"""Entry point of diffcore-vae: registers the autoencoder families. Imports no torch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import diffcore
from diffcore_vae.config import FAMILIES, AutoencoderConfig

_DESCRIPTIONS = {
    "sd": "SD1.x/2.x KL autoencoder, 4 channels, scale 0.18215",
    "sdxl": "SDXL KL autoencoder, 4 channels, scale 0.13025",
    "sd3": "SD3/SD3.5 KL autoencoder, 16 channels, scale 1.5305, shift 0.0609",
    "flux": "Flux.1 KL autoencoder, 16 channels, scale 0.3611, shift 0.1159",
    "flux2": "Flux.2 autoencoder, 32 channels patchified to 128, batch-norm normalised",
}


def build(config: AutoencoderConfig) -> Any:
    """Factory of every family; torch loads here, not at discovery."""
    from diffcore_vae.autoencoder import build_autoencoder

    return build_autoencoder(config)


@diffcore.hookimpl
def diffcore_register_autoencoders() -> Iterable[diffcore.AutoencoderSpec]:
    return [
        diffcore.AutoencoderSpec(name=name, config=cls, factory=build, description=_DESCRIPTIONS[name])
        for name, cls in FAMILIES.items()
    ]
