"""Noise schedules: DDPM-family betas and rectified-flow shifts.

Betas are computed in float32 the way the published schedules (and the checkpoints trained on them)
define them; everything downstream is float64 so sampler coefficients lose nothing.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

# A schedule value: one float or a tensor of them; shifts return the same kind they are given.
S = TypeVar("S", torch.Tensor, float)

# Euler-type samplers divide by alpha; a zero-terminal-SNR schedule gets this floor for sampling only.
ZERO_SNR_FLOOR = 2.0**-24


def betas_for(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas (float32, shape (T,)) of a named schedule: "linear", "scaled_linear", "squaredcos_cap_v2"."""
    n = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine alpha-bar with s = 0.008, betas capped at 0.999
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha-bar) so the last timestep is pure noise (Lin et al. 2023, alg. 1),
    keeping the first timestep's value."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha-bar_t = prod(1 - beta) as float64 (accumulated in the betas' own dtype)."""
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def ve_sigmas(abar: torch.Tensor) -> torch.Tensor:
    """The variance-exploding noise level sqrt((1 - abar) / abar) of each timestep."""
    return ((1.0 - abar) / abar) ** 0.5


def sigma_to_t(sigma: torch.Tensor, ve_table: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of each VE sigma, linear in log sigma between table entries."""
    log_table = ve_table.log()
    log_sigma = sigma.clamp(min=1e-10).log()
    low = (log_sigma[None, :] >= log_table[:, None]).cumsum(0).argmax(0).clamp(max=len(log_table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def interp_table(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear lookup of ``table`` at fractional timesteps ``t``."""
    t = t.to(torch.float64).clamp(0, len(table) - 1)
    low = t.floor().long().clamp(max=len(table) - 2)
    w = t - low
    return table[low] * (1 - w) + table[low + 1] * w


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels: uniform in sigma^(1/rho) from sigma_max down to sigma_min."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def discrete_timesteps(
    num_train_timesteps: int, steps: int, spacing: str, offset: int = 0, multistep: bool = False
) -> torch.Tensor:
    """Inference timesteps (float64, descending) for a spacing, as the common implementations
    space them (Lin et al. 2023, table 2). ``multistep`` selects the DPM-Solver variant, which spaces
    steps + 1 points and drops the last; "linspace" timesteps stay fractional for the Euler family."""
    T = num_train_timesteps
    if spacing == "leading":
        if multistep:
            ratio = T // (steps + 1)
            t = (torch.arange(steps + 1, dtype=torch.float64) * ratio).flip(0)[:-1]
        else:
            t = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0)
        return t + offset
    if spacing == "trailing":
        import numpy as np  # arange with a fractional step: numpy's point count is the reference one

        return torch.from_numpy(np.arange(T, 0, -T / steps).round() - 1).to(torch.float64)
    if spacing == "linspace":
        if multistep:
            return torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
        return torch.linspace(0, T - 1, steps, dtype=torch.float64).flip(0)
    raise ValueError(f"unknown timestep spacing {spacing!r}")


def lcm_timesteps(num_train_timesteps: int, steps: int, original_steps: int = 50) -> torch.Tensor:
    """Latent consistency models' inference timesteps (float64, descending): ``steps`` evenly spaced
    indices into the ``original_steps`` skipping-step grid k - 1, 2k - 1, ..., T - 1 (k = T //
    original_steps) that LCM distillation trains on, as diffusers' LCMScheduler picks them."""
    if steps > original_steps:
        raise ValueError(f"LCM sampling takes at most {original_steps} steps (its distillation grid), got {steps}")
    k = num_train_timesteps // original_steps
    grid = (torch.arange(1, original_steps + 1, dtype=torch.float64) * k - 1).flip(0)
    # the indices floor(i * original_steps / steps), computed in integers so none rounds down wrongly
    index = torch.tensor([i * original_steps // steps for i in range(steps)])
    return grid[index]


# -- rectified flow -------------------------------------------------------------------------------
def fixed_shift(s: S, shift: float) -> S:
    """SD3's shift: s' = k s / (1 + (k - 1) s); k = 1 is the identity, k > 1 spends more time at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def time_shift(s: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's exponential shift: s' = e^mu / (e^mu + (1/s - 1)); equals fixed_shift with k = e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def flux1_mu(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux.1's resolution-dependent mu: the line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift) at the latent token count."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


FLUX2_A1, FLUX2_B1 = 8.73809524e-05, 1.89833333
FLUX2_A2, FLUX2_B2 = 0.00016927, 0.45666666


def flux2_mu(seq_len: int, steps: int | None) -> float:
    """Flux.2's empirical mu, fitted at 10 and 200 steps and linear in the step count between them;
    above 4300 tokens (or with no step count, as in training) the 200-step line alone."""
    m_200 = FLUX2_A2 * seq_len + FLUX2_B2
    if steps is None or seq_len > 4300:
        return m_200
    m_10 = FLUX2_A1 * seq_len + FLUX2_B1
    slope = (m_200 - m_10) / 190.0
    return slope * steps + (m_200 - 200.0 * slope)
