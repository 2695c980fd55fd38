"""diffcore entry point: registers the ``sd3`` and ``sd35`` models (torch-free at import)."""

from __future__ import annotations

import diffcore
from diffcore_sd3.config import SD3Config, SD3MediumConfig


def _build(config: SD3Config):
    from diffcore_sd3.loading import build_sd3

    return build_sd3(config)


@diffcore.hookimpl
def diffcore_register_models():
    return [
        diffcore.ModelSpec(
            cache_aware=True,
            name="sd3",
            config=SD3MediumConfig,
            factory=_build,
            description="Stable Diffusion 3 medium (MMDiT) with CLIP-L, CLIP-G and optional T5-XXL",
        ),
        diffcore.ModelSpec(
            cache_aware=True,
            name="sd35",
            config=SD3Config,
            factory=_build,
            description="Stable Diffusion 3.5 large, large-turbo and medium (MMDiT-X) with CLIP-L, CLIP-G and T5-XXL",
        ),
    ]
