"""Building a model with ``model.quantize``: the factory runs with the streaming hook on, then what no
file streamed (a randomly initialised model, a part built in memory) is quantised by the same rule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.quantize.active import Plan, quantizing
from diffcore.quantize.allocator import mapped_allocations
from diffcore.quantize.library import quantize_weight, require
from diffcore.quantize.streaming import offer
from diffcore.quantize.tensors import dense, install, is_quantized

WHERE = "$.model.quantize"


def build_quantized(
    mode: str, build: Any, device: torch.device | str | None = None, mixed_precision: str = "no"
) -> Any:
    """``build()`` (a model factory call) with its frozen Linear weights in ``mode``.
    ``mixed_precision``: the job's ``train.mixed_precision`` (DeepSpeed casts the backbone to it)."""
    require(mode, device, where=WHERE)
    # on a GPU each weight is quantised there as it streams (NF4 takes minutes per billion weights on
    # a CPU); the model moves there next anyway
    on = str(device) if device is not None and torch.device(device).type == "cuda" else None
    with mapped_allocations(), quantizing(mode, on) as plan:
        model = build()
    quantize_in_memory(model, plan)
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if mode == "fp8" and cast is not None:
        # DeepSpeed's cast of the backbone leaves a Float8Tensor's nominal dtype as it was, and its
        # weight-only matmul then refuses the half-precision input (torchao 0.18): requantise to it
        retype(model.backbone, cast)
    if not plan.quantized:
        raise UserError(
            f"{mode}: this model has no Linear weight inside its repeated blocks or text encoders' layers to quantise",
            where=WHERE,
            hint="set model.quantize: none",
        )
    return model


def quantize_in_memory(model: Any, plan: Plan) -> None:
    """Quantise the selected Linear weights still at full precision (those that did not stream)."""
    for root in quantized_roots(model, every=True):
        for name, param in list(root.named_parameters()):
            quantized = offer(plan, root, name, param.data)
            if quantized is not None:
                install(root, name, quantized)


def retype(root: nn.Module, dtype: torch.dtype) -> None:
    """Requantise ``root``'s fp8 weights whose nominal dtype is not ``dtype``, one at a time."""
    for name, buffer in list(root.named_buffers()):
        if is_quantized(buffer) and buffer.dtype != dtype:
            install(root, name, quantize_weight("fp8", dense(buffer).to(dtype)))


def quantized_roots(model: Any, *, every: bool = False) -> list[nn.Module]:
    """The backbone and the text encoders (``every``), or those of them holding quantised weights."""
    roots: list[nn.Module] = [model.backbone, *model.frozen.values()]
    return roots if every else [r for r in roots if any(is_quantized(b) for b in r.buffers())]


def check_frozen(model: Any, trainable: Iterable[torch.Tensor], adapter_params: Iterable[torch.Tensor] = ()) -> None:
    """The quantised base is frozen: a job that trains the backbone or a text encoder holding
    quantised weights other than through an adapter (a full finetune) is a user error naming the fix."""
    own = {id(p) for p in adapter_params}
    base = {id(p) for root in quantized_roots(model) for p in root.parameters()}
    if any(id(p) in base and id(p) not in own for p in trainable):
        raise UserError(
            "the quantised base is frozen, but this job trains it (a full finetune, or a method that unfreezes it)",
            where=WHERE,
            hint="train an adapter on top (adapter: {type: lora}), or set model.quantize: none",
        )
