"""The streaming hook: while a model loads under :func:`diffcore.quantize.active.quantizing`, :func:`diffcore.weights.load_into`
hands each tensor here as soon as it is read, and a Linear weight that the rule selects is stored
quantised at once; the full-precision backbone never exists in memory.

The rule: an ``nn.Linear`` weight that lies inside an ``nn.ModuleList``. That is every Linear of the
backbone's repeated blocks (``repeated_blocks()`` names ModuleLists, by the model contract) and of the
text encoders' layer stacks, and it leaves in full precision the Linears outside any list: patch,
text, time and guidance embedders, shared modulation heads, final layers and projections (CLIP's
text projection). Those hold a few percent of the weights and sit at the model's input and output,
where quantisation error is least diluted. Autoencoders build with the hook paused (their
attention Linears stay full precision; convolutions are never quantised).
"""

from __future__ import annotations

import torch
from torch import nn

from diffcore.quantize.active import Plan, current
from diffcore.quantize.allocator import return_freed_memory
from diffcore.quantize.library import eligible, quantize_weight


def selected(root: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``root`` is a Linear weight inside a ModuleList."""
    owner_name, _, leaf = name.rpartition(".")
    if leaf != "weight" or not owner_name:
        return False
    node = root
    in_list = False
    for part in owner_name.split("."):
        node = node._modules[part]  # type: ignore[assignment]
        in_list = in_list or isinstance(node, nn.ModuleList)
    return in_list and isinstance(node, nn.Linear)


def offer(plan: Plan, root: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor | None:
    """``value`` quantised when the rule selects it and the mode can hold it, else None."""
    if not selected(root, name):
        return None
    if not eligible(plan.mode, value):
        plan.skipped.append(name)
        return None
    plan.quantized += 1
    plan.full_bytes += value.numel() * value.element_size()
    # what the previous tensors left free goes back before this one's temporaries are made
    return_freed_memory()
    if plan.device is not None:
        value = value.to(plan.device)
    quantized = quantize_weight(plan.mode, value)
    return_freed_memory()
    return quantized


def streamed(root: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor | None:
    """The hook ``load_into`` calls for each tensor: its quantised form, or None (store it as is)."""
    plan = current()
    if plan is None:
        return None
    return offer(plan, root, name, value)
