"""Whether a file is an adapter this plugin reads, and in which format (torch-free:
``AdapterSpec.detect``).

kohya/ComfyUI/LyCORIS files name layers ``lora_unet_...`` / ``lora_te<N>_...`` with ``lora_down``,
``lokr_*`` or ``hada_*`` tensors; PEFT/diffusers files carry ``.lora_A.weight`` / ``.lora_B.weight``.
"""

from __future__ import annotations

from diffcore.layouts import LayoutProbe

_KOHYA_TENSORS = (".lora_down.weight", ".lokr_w1", ".lokr_w2", ".hada_w1_a")


def detect(probe: LayoutProbe) -> str | None:
    """"kohya", "peft" or None (a folder is never an adapter file)."""
    if not probe.is_file or not probe.shapes:
        return None
    keys = list(probe.shapes)
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "peft"
    if any(k.startswith("lora_") and any(t in k for t in _KOHYA_TENSORS) for k in keys):
        return "kohya"
    return None
