"""diffcore entry point: registers the ``flux`` model (torch-free at import)."""

from __future__ import annotations

import diffcore
from diffcore_flux.config import FluxConfig


def _build(config: FluxConfig):
    from diffcore_flux.loading import build_flux

    return build_flux(config)


@diffcore.hookimpl
def diffcore_register_models():
    return [
        diffcore.ModelSpec(
            cache_aware=True,
            name="flux",
            config=FluxConfig,
            factory=_build,
            description="Flux.1 dev/schnell transformer with T5 + CLIP-L text and optional Kontext references",
        )
    ]
