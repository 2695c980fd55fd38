"""Adapted layers: an nn.Linear or nn.Conv2d instance whose class is swapped for a subclass that runs
its adapter branches.

Swapping the class (instead of wrapping the layer) keeps everything the model code relies on:
``isinstance(layer, nn.Linear)``, ``layer.weight``, and the backbone's own state-dict keys. The
branches are ordinary submodules under ``layer.adapters`` (plain parameters, no hooks), so DeepSpeed
and optimizers see them like any other parameter. :func:`remove_branch` restores the original class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.quantize.tensors import dense
from diffcore_lora.branches import Branch


class AdaptedLayer:
    """Mixin placed before the layer's own class; ``_plain_class`` is what it was."""

    _plain_class: type[nn.Module]
    adapters: nn.ModuleDict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight_branches, act_branches, reads_weight = self._active
        weight = dense(self.weight) if reads_weight else self.weight
        # Branches are called as modules (not through a bare method) so that hooks which gather
        # partitioned parameters, as DeepSpeed ZeRO-3's do, see them run.
        for branch in weight_branches:
            weight = branch(weight)
        out = self._base_op(x, weight, self.bias)
        for branch in act_branches:
            out = branch(self, x, out, weight)
        return out

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class _AdaptedLinear(AdaptedLayer):
    def _base_op(self, x, weight, bias):
        return F.linear(x, weight, bias)


class _AdaptedConv2d(AdaptedLayer):
    def _base_op(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


_CLASSES: dict[type, type] = {}


def supports(layer: nn.Module) -> bool:
    """Whether an adapter can be injected into ``layer`` (Linear, or an ungrouped zero-padded Conv2d)."""
    if isinstance(layer, AdaptedLayer):
        return True
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"


def _adapted_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _CLASSES:
        mixin = _AdaptedConv2d if issubclass(cls, nn.Conv2d) else _AdaptedLinear
        _CLASSES[cls] = type(f"Adapted{cls.__name__}", (mixin, cls), {"_plain_class": cls})
    return _CLASSES[cls]


def refresh(layer: nn.Module) -> None:
    """Recompute which branches run (after adding, removing, merging or muting one)."""
    branches = [b for b in layer.adapters.values() if not b.merged and b.strength != 0.0]
    layer._active = (
        tuple(b for b in branches if b.weight_space),
        tuple(b for b in branches if not b.weight_space),
        any(b.reads_weight for b in branches),
    )


def add_branch(layer: nn.Module, name: str, branch: Branch) -> None:
    if not isinstance(layer, AdaptedLayer):
        layer.__class__ = _adapted_class(type(layer))
        layer.adapters = nn.ModuleDict()
    layer.adapters[name] = branch
    refresh(layer)


def remove_branch(layer: nn.Module, name: str) -> None:
    if not isinstance(layer, AdaptedLayer) or name not in layer.adapters:
        return
    del layer.adapters[name]
    if len(layer.adapters):
        refresh(layer)
        return
    del layer.adapters
    del layer._active
    layer.__class__ = layer._plain_class
