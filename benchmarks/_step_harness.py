"""What the architecture step benchmarks (sd3_step, flux_step, flux2_step) share: one training step
(forward, MSE, backward, AdamW) of diffcore's backbone beside diffusers' on the same weights and batch,
the two interleaved in one process so a busy machine slows both alike.

Time: on a CPU this process's CPU time (``time.process_time``, one thread by default), so other work
on a shared machine does not count; on CUDA wall time between synchronisations. Memory: the bytes
autograd keeps for backward in one forward (every device), and on CUDA the peak allocation growth of
one step.

The optimizer: ``--optimizer own`` (the default) gives each side the AdamW its trainer builds:
diffcore's built-in ``adamw`` (fused kernels on CUDA and CPU) and ``torch.optim.AdamW`` with its
defaults for diffusers (what the diffusers training scripts construct). ``--optimizer same`` gives
both torch's default AdamW, so only the model differs. The printout names the choice.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def add_common_options(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="per-block activation checkpointing in both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps shared machines steady)")
    p.add_argument(
        "--optimizer", default="own", choices=["own", "same"],
        help="own: each trainer's AdamW (diffcore's built-in, torch's defaults for diffusers); same: torch's defaults on both",
    )  # fmt: skip


def optimizer(which: str, module: torch.nn.Module, choice: str) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if which == "diffcore" and choice == "own":
        from diffcore.api import component_config
        from diffcore.registry import get_registry

        # what a job without a train.optimizer section trains with
        return (
            get_registry()
            .get("optimizer", "adamw")
            .spec.factory(params, component_config("optimizer", "adamw"), 1e-4)
        )
    return torch.optim.AdamW(params, lr=1e-4)


def stepper(which: str, module: torch.nn.Module, forward: Forward, x: dict[str, torch.Tensor], choice: str):
    opt = optimizer(which, module, choice)
    module.train()

    def step() -> float:
        loss = torch.nn.functional.mse_loss(forward(x).float(), x["target"].float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def activation_bytes(module: torch.nn.Module, forward: Forward, x: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (parameters and buffers excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in module.buffers()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(x)
    total = sum(kept.values())
    out.float().mean().backward()
    module.zero_grad(set_to_none=True)
    return total


def peak_bytes(step: Callable[[], float], device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@attrs.frozen
class Figures:
    first_loss: dict[str, float]
    median_ms: dict[str, float]
    best_ms: dict[str, float]
    activations: dict[str, int]
    peak: dict[str, int | None]


def compare(
    sides: dict[str, tuple[torch.nn.Module, Forward]], x: dict[str, torch.Tensor], args: Any
) -> Figures:
    """Interleave the sides' steps (``args.warmup`` untimed, then ``args.steps`` timed each)."""
    steps, activations = {}, {}
    for which, (module, forward) in sides.items():
        activations[which] = activation_bytes(module, forward, x)
        steps[which] = stepper(which, module, forward, x, args.optimizer)
    losses = {w: steps[w]() for w in steps}  # same weights, same batch: the first losses agree
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {w: [] for w in steps}
    clock = time.perf_counter if args.device.startswith("cuda") else time.process_time
    for _ in range(args.steps):
        for which, step in steps.items():
            sync(args.device)
            start = clock()
            step()
            sync(args.device)
            times[which].append(clock() - start)
    peak = {w: peak_bytes(steps[w], args.device) for w in steps}
    return Figures(
        first_loss=losses,
        median_ms={w: statistics.median(t) * 1000 for w, t in times.items()},
        best_ms={w: min(t) * 1000 for w, t in times.items()},
        activations=activations,
        peak=peak,
    )


def report(title: str, figures: Figures, args: Any, indent: str = "") -> None:
    f = figures
    opt = "each trainer's AdamW" if args.optimizer == "own" else "torch's default AdamW on both"
    print(title + (", activation checkpointing" if args.checkpointing else "") + f"; {opt}")
    print(
        f"{indent}first loss: diffcore {f.first_loss['diffcore']:.6f}  diffusers {f.first_loss['diffusers']:.6f}"
    )
    mib = 2**20
    for w in ("diffcore", "diffusers"):
        line = (
            f"{indent}{w:>9}: step {f.median_ms[w]:8.1f} ms (median of {args.steps}, best {f.best_ms[w]:.1f})"
            f"  activations {f.activations[w] / mib:8.1f} MiB"
        )
        peak = f.peak[w]
        if peak is not None:
            line += f"  peak step memory {peak / mib:8.1f} MiB"
        print(line)
    ratios = (
        f"time {f.median_ms['diffcore'] / f.median_ms['diffusers']:.3f}"
        f" (best {f.best_ms['diffcore'] / f.best_ms['diffusers']:.3f})"
        f"  activations {f.activations['diffcore'] / f.activations['diffusers']:.3f}"
    )
    ours, theirs = f.peak["diffcore"], f.peak["diffusers"]
    if ours is not None and theirs:
        ratios += f"  peak memory {ours / theirs:.3f}"
    print(f"{indent}ratio diffcore/diffusers: " + ratios)
