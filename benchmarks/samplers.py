"""Sampler overhead: diffcore's samplers vs the diffusers scheduler loops, same toy model and noise.

The model is a cheap elementwise function, so the figures are the samplers' own cost per run.
Run: python benchmarks/samplers.py [--steps 30] [--size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import diffusers
import torch

from diffcore.diffusion.objectives import to_x0_eps
from diffcore.diffusion.samplers import run
from diffcore.diffusion.scheduler import DDPMScheduler


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.6 * x * torch.cos(t / 700.0) + 0.05 * torch.tanh(t / 500.0)


def ours(sampler: str, steps: int, noise: torch.Tensor, karras: bool) -> torch.Tensor:
    schedule = DDPMScheduler().sampling_schedule(steps, sampler, karras=karras)

    def denoise(x, i):
        out = toy(x, torch.tensor(float(schedule.timesteps[i])))
        return to_x0_eps(out, x, float(schedule.alphas[i]), float(schedule.sigmas[i]), "eps")

    return run(sampler, denoise, noise, schedule, generator=torch.Generator().manual_seed(0))


def theirs(cls, steps: int, noise: torch.Tensor, karras: bool) -> torch.Tensor:
    kwargs = {"use_karras_sigmas": True} if karras else {}
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kwargs)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = toy(sched.scale_model_input(x, t), t.float())
        x = sched.step(out, t, x).prev_sample
    return x


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    noise = torch.randn(1, 4, args.size, args.size, generator=torch.Generator().manual_seed(0))
    cases = [
        ("ddim", diffusers.DDIMScheduler, False),
        ("euler", diffusers.EulerDiscreteScheduler, False),
        ("heun", diffusers.HeunDiscreteScheduler, False),
        ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, True),
    ]
    print(f"{args.steps} steps, latents 1x4x{args.size}x{args.size}, best of {args.repeats}")
    print(f"{'sampler':<10} {'diffcore ms':>12} {'diffusers ms':>13} {'ratio':>7}")
    for name, cls, karras in cases:
        a = best_of(lambda n=name, k=karras: ours(n, args.steps, noise, k), args.repeats)
        b = best_of(lambda c=cls, k=karras: theirs(c, args.steps, noise, k), args.repeats)
        print(f"{name:<10} {a * 1e3:>12.1f} {b * 1e3:>13.1f} {a / b:>7.2f}")


if __name__ == "__main__":
    main()
