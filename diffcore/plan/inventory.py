"""What a job holds on the device, read from its model built on the meta device (no weights loaded):
parameters by part and dtype, what trains, the repeated blocks, and the activation memory of one
training step at the largest bucket, measured with and without activation checkpointing."""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import torch
from torch import nn

from diffcore.api import build_component
from diffcore.context import StepRandom, TrainContext
from diffcore.data.collate import collate
from diffcore.data.crops import buckets_of
from diffcore.plan.live import LiveBytes, fused_attention
from diffcore.training.assemble import context_for, largest_example

META = torch.device("meta")


@attrs.frozen
class Part:
    """One group of parameters that sits on the device."""

    name: str
    #: bytes as the job loads them (their own dtype)
    bytes: int
    params: int
    #: bytes of the 2-D ``nn.Linear`` weights among them: what a quantised base stores in fewer bits
    linear_bytes: int = 0
    linear_params: int = 0
    #: elements of a factored second moment (Adafactor): rows + columns per matrix, else the size
    factored: int = 0


@attrs.frozen
class Activations:
    """Peak live bytes of a forward and backward (saved tensors, transients and the gradients made)."""

    plain: int
    checkpointed: int | None  # None: the model has no activation checkpointing
    #: the gradients of the trainable parameters, included in both peaks
    grads: int


@attrs.frozen
class Inventory:
    architecture: str
    #: the frozen parts: the backbone's frozen weights, text encoders, autoencoder
    frozen: list[Part]
    #: what trains (adapter, unfrozen backbone, method modules)
    trainable: Part
    #: bytes of frozen weights per repeated block, in the order the model declares them
    block_frozen_bytes: list[int]
    activations: Activations
    bucket: tuple[int, int]
    batch_size: int
    tokens: int
    #: forward FLOPs of one sample (the model's own figure, else 2 x backbone parameters x tokens)
    flops_per_sample: float
    full_finetune: bool
    #: of each block's frozen bytes, those of its Linear weights (a quantised base keeps them on the
    #: device under block swap)
    block_linear_bytes: list[int] = attrs.Factory(list)

    @property
    def frozen_bytes(self) -> int:
        return sum(p.bytes for p in self.frozen)

    @property
    def blocks(self) -> int:
        return len(self.block_frozen_bytes)


def _part(name: str, params: list[nn.Parameter], linear_ids: set[int]) -> Part:
    linear = [p for p in params if id(p) in linear_ids]
    return Part(
        name=name,
        bytes=sum(p.numel() * p.element_size() for p in params),
        params=sum(p.numel() for p in params),
        linear_bytes=sum(p.numel() * p.element_size() for p in linear),
        linear_params=sum(p.numel() for p in linear),
        factored=sum(_factored(p) for p in params),
    )


def _factored(p: nn.Parameter) -> int:
    if p.ndim < 2:
        return p.numel()
    lead = p.numel() // (p.shape[-1] * p.shape[-2])
    return lead * (p.shape[-1] + p.shape[-2])


def _unique(params: Any) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _linear_weights(module: nn.Module) -> set[int]:
    return {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}


def _build_model(job: Any, device: torch.device) -> Any:
    """The job's model with every weight on ``device`` (the meta device: no memory)."""
    try:
        with torch.device(device):
            model = build_component("model", job.model.type, job.model.config)
    except (NotImplementedError, RuntimeError, ValueError, TypeError):
        # a loader that reads real values while it builds: build on the CPU, then drop the memory
        model = build_component("model", job.model.type, job.model.config)
    return model.to(device)


def build_context(job: Any, dataset: Any, device: torch.device = META) -> TrainContext:
    """The model, scheduler, method and adapter as a run builds them, every weight on ``device``."""
    return context_for(job, _build_model(job, device), dataset, device, build_on=device)



def step_peak(ctx: TrainContext, batch: dict[str, Any]) -> int:
    """Peak bytes live during one forward and backward of ``batch`` (beyond what existed before)."""
    ctx.step_random = StepRandom(ctx.job.seed, 0)
    fused = fused_attention() if ctx.device.type == "meta" else contextlib.nullcontext()
    with LiveBytes() as live, fused:
        loss, _ = ctx.method.loss(ctx, batch)
        loss.backward()
    peak = live.peak
    for p in ctx.trainable:
        p.grad = None
    return peak


def inventory(job: Any, dataset: Any) -> Inventory:
    """Measure the job: the model on the meta device, one step at the largest bucket."""
    ctx = build_context(job, dataset)
    model = ctx.model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job.train.mixed_precision)
    trainable_ids = {id(p) for p in ctx.trainable}
    trainable_modules = [
        model.backbone,
        *(
            m
            for m in model.trainable_modules().values()
            if any(id(p) in trainable_ids for p in m.parameters())
        ),
    ]
    if dtype is not None:
        # DeepSpeed casts the modules it wraps (those holding a trainable parameter) to the
        # training dtype: the frozen weights inside them are stored in it
        for module in [*trainable_modules, *ctx.method_modules.values()]:
            module.to(dtype)
    frozen_parts: list[Part] = []
    # model.quantize stores the Linear weights inside the repeated blocks and the text encoders
    backbone_linear: set[int] = set()
    for path in model.repeated_blocks():
        backbone_linear |= _linear_weights(model.backbone.get_submodule(path))
    frozen_parts.append(
        _part(
            "backbone",
            [p for p in _unique(model.backbone.parameters()) if id(p) not in trainable_ids],
            backbone_linear,
        )
    )
    for name, module in model.frozen.items():
        params = [p for p in _unique(module.parameters()) if id(p) not in trainable_ids]
        frozen_parts.append(_part(f"text encoder {name}", params, _linear_weights(module)))
    if model.autoencoder is not None:
        ae = [p for p in _unique(model.autoencoder.module.parameters()) if id(p) not in trainable_ids]
        frozen_parts.append(_part("autoencoder", ae, set()))
    all_linear = set().union(*(_linear_weights(m) for m in [model.backbone, *ctx.method_modules.values()]))
    trainable = _part("trainable", ctx.trainable, all_linear)

    block_bytes: list[int] = []
    block_linear: list[int] = []
    for path in model.repeated_blocks():
        for block in model.backbone.get_submodule(path):
            frozen = [p for p in _unique(block.parameters()) if id(p) not in trainable_ids]
            linear = _linear_weights(block)
            block_bytes.append(sum(p.numel() * p.element_size() for p in frozen))
            block_linear.append(sum(p.numel() * p.element_size() for p in frozen if id(p) in linear))

    index = largest_example(ctx.dataset)
    bucket = buckets_of(ctx.dataset)[index]
    batch = collate([ctx.dataset[index]] * job.train.batch_size)
    model.backbone.train()
    grads = trainable.bytes if dtype is None else trainable.params * torch.finfo(dtype).bits // 8
    checkpointing = _has_checkpointing(model)  # and turned off, for the plain step
    plain = step_peak(ctx, batch)
    checkpointed = None
    if checkpointing:
        model.set_gradient_checkpointing(True)
        checkpointed = step_peak(ctx, batch)
        model.set_gradient_checkpointing(job.train.gradient_checkpointing)
    latents = _latent_shape(ctx, batch)
    tokens = model.sequence_length(torch.empty(latents, device=META))
    flops = model.flops_per_sample(torch.empty(latents, device=META))
    if flops is None:
        backbone_params = sum(p.numel() for p in _unique(model.backbone.parameters()))
        flops = 2.0 * backbone_params * tokens
    return Inventory(
        architecture=job.model.type,
        frozen=[p for p in frozen_parts if p.params],
        trainable=trainable,
        block_frozen_bytes=block_bytes,
        block_linear_bytes=block_linear,
        activations=Activations(plain=plain, checkpointed=checkpointed, grads=grads),
        bucket=bucket,
        batch_size=job.train.batch_size,
        tokens=tokens,
        flops_per_sample=float(flops),
        full_finetune=any(id(p) in trainable_ids for p in model.backbone.parameters())
        and job.adapter is None,
    )


def _has_checkpointing(model: Any) -> bool:
    """Whether the model has activation checkpointing; turns it off when it has."""
    from diffcore.errors import UserError

    try:
        model.set_gradient_checkpointing(False)
    except UserError:
        return False
    return True


def _latent_shape(ctx: TrainContext, batch: dict[str, Any]) -> tuple[int, ...]:
    if "latents" in batch:
        return tuple(batch["latents"].shape)
    with torch.no_grad():
        return tuple(ctx.model.encode_images(batch["pixels"][:1].to(META)).shape)
