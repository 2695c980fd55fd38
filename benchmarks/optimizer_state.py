"""Optimizer state and step time: each diffcore-optimizers optimizer against torch's AdamW, in one run.

    python benchmarks/optimizer_state.py [--hidden 1024] [--device cpu|cuda] [--repeats 5] [--threads 1]

The parameters are one transformer block's (four hidden x hidden projections, an MLP of 4 x hidden,
their biases), in fp32 as a LoRA or the master weights of a full finetune are. After one step the
state every optimizer holds is counted in bytes per trained parameter (what ``diffcore plan`` and a
reader sizing a run need), and the median time of a step is printed with its ratio to AdamW's
(below 1.0: faster than AdamW). Prodigy's two extra copies shrink with its ``slice_p`` key.
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffcore_optimizers.plugin
import torch


def block_params(hidden: int, device: str) -> list[torch.nn.Parameter]:
    shapes = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden), (hidden,), (4 * hidden,)]
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.02).to(device)) for s in shapes]


def measure(build, set_mode, hidden: int, device: str, repeats: int) -> tuple[float, float]:
    params = block_params(hidden, device)
    optimizer = build(params)
    if set_mode is not None:
        set_mode(optimizer, True)
    times = []
    for _ in range(repeats + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    state = sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return state / sum(p.numel() for p in params), statistics.median(times[1:])  # the first step allocates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [("adamw (torch, reference)", lambda ps: torch.optim.AdamW(ps, lr=1e-3), None)]
    for spec in diffcore_optimizers.plugin.diffcore_register_optimizers():
        rows.append((spec.name, lambda ps, spec=spec: spec.factory(ps, spec.config(), 1e-3), spec.set_mode))
    results = [(name, *measure(build, mode, args.hidden, args.device, args.repeats)) for name, build, mode in rows]
    reference = results[0][2]
    n = sum(p.numel() for p in block_params(args.hidden, "cpu"))
    print(f"{n / 1e6:.1f}M fp32 parameters (hidden {args.hidden}) on {args.device}, median of {args.repeats} steps")
    print(f"{'optimizer':<26} {'state B/param':>13} {'step ms':>9} {'vs adamw':>9}")
    for name, per_param, seconds in results:
        print(f"{name:<26} {per_param:>13.2f} {seconds * 1e3:>9.1f} {seconds / reference:>9.2f}")


if __name__ == "__main__":
    main()
