"""Stacking saved adapter files on a model at sampling time (what ``diffcore sample`` calls).

    from diffcore_lora.stack import apply_adapters
    adapters = apply_adapters(model, [("style.safetensors", 0.8), ("subject.safetensors", 1.0)])
    adapters[0].set_strength(0.5)     # change one later
    for a in adapters: a.detach()     # take them all off again

Files may be kohya/ComfyUI LoRA, DoRA, LyCORIS LoKr/LoHa, or PEFT/diffusers LoRA; each is detected
from its keys. Through the registry: ``registry.get("adapter", "lora").spec.factory(config)`` returns a
:class:`~diffcore_lora.adapter.NetworkAdapter`, whose ``apply_adapters`` is this function.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffcore_lora.adapter import NetworkAdapter


def apply_adapters(
    model: Any, files: Sequence[tuple[str | Path, float]], *, merge: bool = False
) -> list[NetworkAdapter]:
    """Attach each (path, strength) adapter file to ``model``; ``merge`` folds them into the weights."""
    return NetworkAdapter.apply_adapters(model, files, merge=merge)


__all__ = ["NetworkAdapter", "apply_adapters"]
