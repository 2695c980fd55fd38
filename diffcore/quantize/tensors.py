"""Telling a quantised weight from a plain one, and reading it back at full precision."""

from __future__ import annotations

import sys

import torch
from torch import nn


def _quantized_types() -> tuple[type, ...]:
    # only when torchao is already imported: a model without quantised weights never imports it
    if "torchao" not in sys.modules:
        return ()
    from torchao.quantization import Float8Tensor, Int8Tensor, NF4Tensor

    return (Int8Tensor, Float8Tensor, NF4Tensor)


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (or the parameter's data) is a quantised weight of ``model.quantize``."""
    types = _quantized_types()
    return bool(types) and isinstance(tensor, types)


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """The full-precision tensor a quantised weight stands for (in its nominal dtype); any other
    tensor as it is. For code that reads a base weight as a whole (weight deltas, row norms)."""
    if not is_quantized(tensor):
        return tensor
    from torchao.quantization import NF4Tensor

    if isinstance(tensor, NF4Tensor):
        return tensor.get_original_weight().to(tensor.dtype)
    return tensor.dequantize()


def install(root: nn.Module, name: str, quantized: torch.Tensor) -> None:
    """Put ``quantized`` in place of the Linear weight ``name`` of ``root``, as a non-persistent
    buffer: the layer reads ``self.weight`` as before, while nothing that walks parameters
    (optimizers, DeepSpeed's broadcast, ZeRO partitioning, ``requires_grad_``, a module's ``to``
    that swaps parameters in place) nor a checkpoint of the module's state dict sees it. The
    base stays where the job's files are; adapter files hold only their own tensors."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._parameters.pop(leaf, None)
    owner.register_buffer(leaf, quantized, persistent=False)
