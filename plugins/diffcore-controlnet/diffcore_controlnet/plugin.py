"""The entry-point module: registers the ``controlnet`` method. It imports no torch; the factory
imports the method when a job builds it."""

from __future__ import annotations

from typing import Any

import diffcore
from diffcore_controlnet.config import ControlNetConfig


def _method(config: ControlNetConfig) -> Any:
    from diffcore_controlnet.method import ControlNetMethod

    return ControlNetMethod(config)


@diffcore.hookimpl
def diffcore_register_methods() -> list[diffcore.MethodSpec]:
    return [
        diffcore.MethodSpec(
            name="controlnet",
            config=ControlNetConfig,
            factory=_method,
            description="trains a ControlNet on the dataset's control images beside the frozen model (SD1.x/2.x, SDXL, Flux.1)",
        )
    ]
