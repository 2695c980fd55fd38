"""The planner's report: the job's memory as written, the options it considered, and its choice."""

from __future__ import annotations

from diffcore.plan.costs import (
    CUDA_CONTEXT_BYTES,
    DEFAULT_TFLOPS,
    MFU,
    PCIE_BYTES_PER_S,
    QUANT_SLOWDOWN,
    SWAP_UNHIDDEN,
    Estimate,
    Settings,
)
from diffcore.plan.inventory import Inventory
from diffcore.plan.search import Plan, fits
from diffcore.plan.sizes import gib


def describe(s: Settings, written: Settings) -> str:
    """The settings that differ from the job, as job keys."""
    parts = []
    if s.blocks_to_swap != written.blocks_to_swap:
        parts.append(f"swap {s.blocks_to_swap}")
    if s.quantize != written.quantize:
        parts.append(f"quantize {s.quantize}")
    if s.checkpointing != written.checkpointing:
        parts.append("checkpointing" if s.checkpointing else "no checkpointing")
    if s.optimizer != written.optimizer:
        parts.append(s.optimizer)
    if s.zero_stage != written.zero_stage:
        parts.append(f"ZeRO {s.zero_stage}")
    if s.offload_optimizer != written.offload_optimizer:
        parts.append("offload optimizer" if s.offload_optimizer else "no optimizer offload")
    if s.offload_params != written.offload_params:
        parts.append("offload params" if s.offload_params else "no param offload")
    return ", ".join(parts) or "as written"


def breakdown(e: Estimate) -> str:
    items = [("frozen weights", e.frozen), ("swap buffer", e.swap_buffer), ("trained weights", e.trained),
             ("optimizer state", e.optimizer), ("fp32 master copy", e.master),
             ("activations and gradients", e.activations), ("the loop itself", e.runtime)]  # fmt: skip
    return ", ".join(f"{name} {gib(v)}" for name, v in items if v)


def render(inv: Inventory, plan: Plan, *, gpus: int, max_rows: int = 16) -> str:
    written = plan.written
    tokens = f"{inv.tokens} tokens" if inv.tokens else ""
    lines = [
        f"{inv.architecture}: {inv.trainable.params:,} trained parameters"
        f"{' (full finetune)' if inv.full_finetune else ''}, largest bucket {inv.bucket[1]}x{inv.bucket[0]} "
        f"({tokens}) x batch {inv.batch_size}, {inv.blocks} repeated blocks, {gpus} GPU{'s' if gpus > 1 else ''}",
        f"as written: {gib(written.device)} on the device ({breakdown(written)})",
        f"device memory {gib(plan.vram)} ({gib(CUDA_CONTEXT_BYTES)} of it kept free for the CUDA context)"
        + (f", host memory {gib(plan.ram)}" if plan.ram is not None else ""),
        "",
        f"  {'option':<56} {'device':>10} {'host':>10} {'step time':>10}  fits",
    ]
    base = written.step_s or 1.0
    rows = sorted(plan.options, key=lambda e: (not fits(e, plan.vram, plan.ram), e.step_s, e.device))
    shown = [written, *[e for e in rows if e.settings != written.settings][: max_rows - 1]]
    if plan.chosen is not None and plan.chosen not in shown:
        shown.append(plan.chosen)
    for e in shown:
        ok = fits(e, plan.vram, plan.ram)
        mark = (
            "*"
            if e is plan.chosen or (plan.chosen is not None and e.settings == plan.chosen.settings)
            else " "
        )
        lines.append(
            f"{mark} {describe(e.settings, written.settings):<56} {gib(e.device):>10} {gib(e.host):>10} "
            f"{e.step_s / base:>9.2f}x  {'yes' if ok else 'no'}"
        )
    lines.append("")
    if plan.chosen is None:
        lines.append(
            "nothing considered fits: lower train.batch_size or the resolution, or use more GPUs (--gpus)"
        )
    elif plan.chosen.settings == written.settings:
        lines.append("the job fits as written")
    else:
        lines.append(
            f"chosen (*): {describe(plan.chosen.settings, written.settings)}: {gib(plan.chosen.device)} on the device"
        )
    lines.append(
        "step time relative to the job as written; basis: forward + backward = 3 forwards (4 with "
        f"checkpointing) at {DEFAULT_TFLOPS:g} TFLOP/s sustained (or train.peak_tflops x {MFU:g}), swapped blocks "
        f"copied twice a step at {PCIE_BYTES_PER_S / 1e9:g} GB/s overlapping compute ({SWAP_UNHIDDEN:.0%} not hidden), "
        "quantised Linear layers "
        + ", ".join(f"{k} x{v:g}" for k, v in QUANT_SLOWDOWN.items() if k != "none")
        + ", the CPU optimizer at 1e9 parameters/s, ZeRO-3 x1.15"
    )
    return "\n".join(lines)
