"""Entry point of diffcore-textual-inversion: registers the ``textual_inversion`` method (no torch
at import)."""

from __future__ import annotations

import diffcore
from diffcore_textual_inversion.config import TextualInversionConfig


def _build(config: TextualInversionConfig):
    from diffcore_textual_inversion.method import TextualInversionMethod

    return TextualInversionMethod(config)


@diffcore.hookimpl
def diffcore_register_methods():
    return [
        diffcore.MethodSpec(
            name="textual_inversion",
            config=TextualInversionConfig,
            factory=_build,
            description="textual inversion: new tokens whose embeddings train (A1111/ComfyUI and diffusers files)",
        )
    ]
