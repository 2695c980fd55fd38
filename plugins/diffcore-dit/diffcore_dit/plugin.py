"""Entry point of diffcore-dit: registers the ``dit`` model (no torch at import)."""

from __future__ import annotations

import diffcore
from diffcore_dit.config import DiTConfig
from diffcore_dit.detect import detect


def _build(config: DiTConfig):
    from diffcore_dit.loading import build_model

    return build_model(config)


@diffcore.hookimpl
def diffcore_register_models():
    return [
        diffcore.ModelSpec(
            cache_aware=True,
            name="dit",
            config=DiTConfig,
            factory=_build,
            detect=detect,
            description="Diffusion Transformer (class-conditional, pixel or latent space; S/B/L/XL, patch 2/4/8)",
        )
    ]
