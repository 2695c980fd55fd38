"""The settings the planner considers for a job, and the cheapest that fits the device."""

from __future__ import annotations

import itertools
from typing import Any

import attrs

from diffcore.plan.costs import CUDA_CONTEXT_BYTES, Estimate, Settings, estimate
from diffcore.plan.inventory import Inventory


def settings_of(job: Any) -> Settings:
    """The memory settings a job has as written."""
    ds = job.train.deepspeed
    optimizer = job.optimizer.type if job.optimizer is not None else "adamw"
    momentum = optimizer == "sgd" and float(job.optimizer.config.momentum) > 0
    foreach = False
    if optimizer == "adamw" and job.optimizer is not None:
        # diffcore.training.fast_paths.adamw_kernels: fused unless the job turns it off; then torch's
        # foreach kernels unless those are off too (a loop over tensors holds one tensor's temporaries)
        config = job.optimizer.config
        foreach = config.foreach is True or (config.fused is False and config.foreach is not False)
    return Settings(
        blocks_to_swap=job.train.blocks_to_swap,
        quantize=job.model.quantize,
        checkpointing=job.train.gradient_checkpointing,
        optimizer=optimizer,
        zero_stage=ds.zero_stage,
        offload_optimizer=ds.offload_optimizer,
        offload_params=ds.offload_params,
        momentum=momentum,
        adamw_foreach=foreach,
    )


@attrs.frozen
class Plan:
    written: Estimate
    #: every option considered (each with the fewest swapped blocks that fit, when swap helps)
    options: list[Estimate]
    chosen: Estimate | None
    vram: int
    ram: int | None


def fits(e: Estimate, vram: int, ram: int | None) -> bool:
    """Whether ``e`` fits a GPU of ``vram`` bytes (the CUDA context kept free) and ``ram`` of host memory."""
    return e.device + CUDA_CONTEXT_BYTES <= vram and (ram is None or e.host <= ram)


def candidates(
    inv: Inventory,
    written: Settings,
    *,
    gpus: int,
    checkpointing_available: bool,
    small_optimizers: list[str],
) -> list[Settings]:
    """Every combination of the discrete options; the swap count is chosen per combination later."""
    checkpointing = (
        sorted({written.checkpointing, True}) if checkpointing_available else [written.checkpointing]
    )
    frozen_base = not inv.full_finetune
    quantize = [written.quantize]
    if frozen_base:
        quantize += [q for q in ("int8", "nf4") if q != written.quantize]
    optimizers = [written.optimizer]
    if written.optimizer == "adamw":
        optimizers += small_optimizers
    stages = sorted({written.zero_stage, *((1, 2, 3) if gpus > 1 else ())})
    offload = sorted({written.offload_optimizer, True})
    out = []
    for ckpt, quant, opt, stage, off in itertools.product(
        checkpointing, quantize, optimizers, stages, offload
    ):
        for off_params in sorted({written.offload_params and stage == 3, stage == 3 and off}):
            out.append(attrs.evolve(written, blocks_to_swap=0, quantize=quant, checkpointing=ckpt, optimizer=opt,
                                    zero_stage=stage, offload_optimizer=off, offload_params=off_params))  # fmt: skip
    return list(dict.fromkeys(out))


def _changes(s: Settings, written: Settings) -> int:
    return sum(getattr(s, f.name) != getattr(written, f.name) for f in attrs.fields(Settings))


def plan(
    inv: Inventory,
    written: Settings,
    *,
    vram: int,
    ram: int | None = None,
    gpus: int = 1,
    precision: str = "no",
    tflops: float | None = None,
    checkpointing_available: bool = True,
    small_optimizers: list[str] | None = None,
) -> Plan:
    """Estimate the job as written and every candidate, and choose the fastest that fits (fewest
    changes from the job on a tie)."""

    def cost(s: Settings) -> Estimate:
        return estimate(inv, s, gpus=gpus, precision=precision, tflops=tflops)

    options = []
    # block swap moves frozen weights only: a full finetune's blocks train
    swap_allowed = not inv.full_finetune and inv.blocks > 0
    for s in candidates(inv, written, gpus=gpus, checkpointing_available=checkpointing_available,
                        small_optimizers=list(small_optimizers or [])):  # fmt: skip
        e = cost(s)
        # block swap refuses ZeRO-3
        if not fits(e, vram, ram) and swap_allowed and s.zero_stage != 3:
            # the fewest swapped blocks that fit: memory falls as the count grows
            for n in range(1, inv.blocks + 1):
                swapped = cost(attrs.evolve(s, blocks_to_swap=n))
                if fits(swapped, vram, ram):
                    e = swapped
                    break
            else:
                e = cost(attrs.evolve(s, blocks_to_swap=inv.blocks))
        options.append(e)
    fitting = [e for e in options if fits(e, vram, ram)]
    chosen = min(fitting, key=lambda e: (round(e.step_s, 9), _changes(e.settings, written)), default=None)
    written_estimate = cost(written)
    if fits(written_estimate, vram, ram):
        chosen = written_estimate
    return Plan(written=written_estimate, options=options, chosen=chosen, vram=vram, ram=ram)
