"""A job's training context around a built model, as a run assembles it: what the doctor's step and
the memory planner both build before they run one step (the loop keeps its own order, with
DeepSpeed and the EMA around it)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from diffcore.api import build_component
from diffcore.context import TrainContext
from diffcore.data.crops import buckets_of


def context_for(
    job: Any, model: Any, dataset: Any, device: torch.device, *, build_on: torch.device | None = None
) -> TrainContext:
    """The job's scheduler and method around ``model``, its adapter attached, the method's modules on
    ``device`` in train mode, and ``trainable`` (each parameter that requires grad, once).

    ``build_on``: the default device while the adapter and the method's modules are made (the
    planner's meta device), so they allocate nothing; the scheduler is built outside it."""
    from diffcore.training.loop import scheduler_section

    sched = scheduler_section(job, model)
    ctx = TrainContext(
        job=job,
        model=model,
        scheduler=build_component("scheduler", sched.type, sched.config),
        method=build_component("method", job.method.type, job.method.config),
        dataset=dataset,
        output_dir=Path(job.output_dir),
        device=device,
    )
    with torch.device(build_on) if build_on is not None else contextlib.nullcontext():
        if job.adapter is not None:
            ctx.adapter = build_component("adapter", job.adapter.type, job.adapter.config)
            ctx.adapter_params = list(ctx.adapter.attach(model))
        ctx.method_modules = {name: m.to(device) for name, m in ctx.method.modules(model).items()}
        for module in ctx.method_modules.values():
            module.train()
        params = [*ctx.method.setup(ctx), *(p for m in ctx.method_modules.values() for p in m.parameters())]
    unique: dict[int, torch.nn.Parameter] = {}
    for param in params:
        if param.requires_grad:
            unique.setdefault(id(param), param)
    ctx.trainable = list(unique.values())
    return ctx


def largest_example(dataset: Any) -> int:
    """The index of an example in the dataset's largest bucket (by area; the first such bucket)."""
    sizes = buckets_of(dataset)
    return max(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], -i))
