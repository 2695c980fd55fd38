"""Entry point: registers the ``sdxl``, ``sd15`` and ``sd21`` models. Imports no torch."""

from __future__ import annotations

from typing import Any

import diffcore
from diffcore_sdxl.config import SD15Config, SD21Config, SDXLConfig
from diffcore_sdxl.detect import detector


def _build(config: Any) -> Any:
    from diffcore_sdxl.model import build_model

    return build_model(config)


@diffcore.hookimpl
def diffcore_register_models() -> list[diffcore.ModelSpec]:
    return [
        diffcore.ModelSpec(
            cache_aware=True,
            name="sdxl",
            config=SDXLConfig,
            factory=_build,
            detect=detector("sdxl"),
            description="Stable Diffusion XL base (UNet, CLIP-L + OpenCLIP-bigG, size/crop conditioning)",
        ),
        diffcore.ModelSpec(
            cache_aware=True,
            name="sd15",
            config=SD15Config,
            factory=_build,
            detect=detector("sd15"),
            description="Stable Diffusion 1.x (UNet, CLIP-L)",
        ),
        diffcore.ModelSpec(
            cache_aware=True,
            name="sd21",
            config=SD21Config,
            factory=_build,
            detect=detector("sd21"),
            description="Stable Diffusion 2.x (UNet, OpenCLIP-H, v-prediction at 768 px)",
        ),
    ]
