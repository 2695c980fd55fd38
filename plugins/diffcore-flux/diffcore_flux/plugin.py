"""diffcore entry point: registers the ``flux`` (Flux.1) and ``flux2`` (Flux.2) models (torch-free at import)."""

from __future__ import annotations

import diffcore
from diffcore_flux.config import FluxConfig
from diffcore_flux.detect import detect_flux, detect_flux2
from diffcore_flux.flux2.config import Flux2Config


def _build(config: FluxConfig):
    from diffcore_flux.loading import build_flux

    return build_flux(config)


def _build_flux2(config: Flux2Config):
    from diffcore_flux.flux2.loading import build_flux2

    return build_flux2(config)


@diffcore.hookimpl
def diffcore_register_models():
    return [
        diffcore.ModelSpec(
            cache_aware=True,
            name="flux",
            config=FluxConfig,
            factory=_build,
            detect=detect_flux,
            description="Flux.1 dev/schnell transformer with T5 + CLIP-L text and optional Kontext references",
        ),
        diffcore.ModelSpec(
            cache_aware=True,
            name="flux2",
            config=Flux2Config,
            factory=_build_flux2,
            detect=detect_flux2,
            description="Flux.2 dev (Mistral) and klein 4B/9B (Qwen3) with multi-reference Kontext and Fill",
        ),
    ]
