"""Entry point of diffcore-dreambooth: registers the ``dreambooth`` method (no torch at import)."""

from __future__ import annotations

import diffcore
from diffcore_dreambooth.config import DreamBoothConfig


def _build(config: DreamBoothConfig):
    from diffcore_dreambooth.method import DreamBoothMethod

    return DreamBoothMethod(config)


@diffcore.hookimpl
def diffcore_register_methods():
    return [
        diffcore.MethodSpec(
            name="dreambooth",
            config=DreamBoothConfig,
            factory=_build,
            description="DreamBooth: instance images plus prior preservation on generated or given class images",
        )
    ]
