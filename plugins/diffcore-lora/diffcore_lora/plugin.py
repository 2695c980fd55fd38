"""Entry point: registers the adapter kinds. Imports no torch (discovery stays cheap)."""

from __future__ import annotations

import diffcore
from diffcore_lora.checks import validate
from diffcore_lora.config import DoraConfig, LohaConfig, LokrConfig, LoraConfig
from diffcore_lora.detect import detect


def _factory(kind: str):
    # The adapter module imports torch, so it is imported when an adapter is built, not here.
    def build(config):
        from diffcore_lora.adapter import NetworkAdapter

        return NetworkAdapter(config, kind=kind)

    build.__name__ = f"build_{kind}"
    return build


@diffcore.hookimpl
def diffcore_register_adapters():
    return [
        diffcore.AdapterSpec(
            name="lora",
            config=LoraConfig,
            factory=_factory("lora"),
            validate=validate,
            # one reader for every kind: from_file takes LoRA, DoRA, LoKr and LoHa tensors alike
            detect=detect,
            description="low-rank adapter (kohya/PEFT)",
        ),
        diffcore.AdapterSpec(
            name="dora",
            config=DoraConfig,
            factory=_factory("dora"),
            validate=validate,
            description="weight-decomposed low-rank adapter (magnitude + LoRA direction)",
        ),
        diffcore.AdapterSpec(
            name="lokr",
            config=LokrConfig,
            factory=_factory("lokr"),
            validate=validate,
            description="Kronecker-product adapter (LyCORIS)",
        ),
        diffcore.AdapterSpec(
            name="loha",
            config=LohaConfig,
            factory=_factory("loha"),
            validate=validate,
            description="Hadamard-product adapter (LyCORIS)",
        ),
    ]
