"""Samplers over a :class:`~diffcore.diffusion.scheduler.SamplingSchedule`.

Each walks the levels of a schedule with a denoiser ``denoise(x, i) -> (x0, eps)`` evaluated at level
i (the caller turns the model's output, of any prediction type, into both). The state ``x`` is the
noisy latent as the model sees it (x = alpha x0 + sigma eps), float32. Steps follow the reference
formulations: DDPM/DDIM in (alpha, sigma), Euler and Heun in the schedule's native coordinates (VE
for DDPM-family, s for flow: both have derivative (y - x0) / level), Euler-ancestral as
k-diffusion, DPM-Solver++(2M) in half-log-SNR, LCM as multistep consistency sampling (Luo et al. 2023).

Samplers are plugins (``diffcore_register_samplers``): a record's factory builds an object
following :class:`Sampler`. The built-in ones are :class:`BuiltinSampler` over :func:`sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import torch

from diffcore.diffusion.guidance import SkipLayerGuidance
from diffcore.diffusion.scheduler import SamplingSchedule, canonical_sampler

Denoiser = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@attrs.frozen
class StepInfo:
    """What the per-step callback receives after step ``step`` (0-based) of ``steps``."""

    step: int
    steps: int
    t: float
    latents: torch.Tensor
    denoised: torch.Tensor


StepCallback = Callable[[StepInfo], None]
#: one generator for the whole batch, or one per row (``diffcore sample``'s per-image seeds); a
#: sampler that draws noise takes either through :func:`noise_like`
Generators = torch.Generator | Sequence[torch.Generator] | None


class Sampler(Protocol):
    """What a sampler record's factory builds.

    ``schedule_as`` names the built-in sampler whose noise-level layout the scheduler gives it
    (``scheduler.sampling_schedule(steps, schedule_as, karras=karras)``: "euler" for linspace
    levels, "ddim" for leading timesteps, "dpmpp_2m" for rounded multistep ones...).
    ``__call__`` walks ``schedule`` from the start latent ``x`` (noise already scaled by
    ``schedule.init_noise_scale``) and returns the final latent; ``denoise(x, i)`` gives (x0, eps)
    at level i, and a stochastic step draws its noise from ``generator`` with :func:`noise_like` (one generator, or one
    per row). A plugin's sampler gets the
    x0 options by giving its config the fields of :class:`diffcore.X0Options` (subclass it) and
    wrapping its denoiser with :func:`with_x0_options`.
    """

    schedule_as: str
    karras: bool

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        schedule: SamplingSchedule,
        *,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor: ...


def threshold_x0(
    x0: torch.Tensor,
    *,
    clip: float | None = None,
    percentile: float | None = None,
    threshold_max: float | None = None,
) -> torch.Tensor:
    """x0 clamped to [-clip, clip], then dynamically thresholded: per sample, s = the ``percentile``
    of |x0| (at least 1, at most ``threshold_max``), x0 clamped to [-s, s] and divided by s."""
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if percentile is not None:
        flat = x0.reshape(x0.shape[0], -1).abs().float()
        s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0)
        if threshold_max is not None:
            s = s.clamp(max=threshold_max)
        s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    return x0


def with_x0_options(denoise: Denoiser, schedule: SamplingSchedule, options: Any) -> Denoiser:
    """``denoise`` with ``options``' x0 clipping and thresholding (the fields of
    :class:`diffcore.X0Options`) applied to its x0, and eps made consistent with it."""
    clip, percentile = options.clip_x0, options.dynamic_threshold
    if clip is None and percentile is None:
        return denoise

    def wrapped(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = denoise(x, i)
        x0 = threshold_x0(x0, clip=clip, percentile=percentile, threshold_max=options.threshold_max)
        sigma = float(schedule.sigmas[i])
        if sigma > 0:  # the noise the step removes must be the noise that leads to this x0
            eps = (x - float(schedule.alphas[i]) * x0) / sigma
        return x0, eps

    return wrapped


@attrs.frozen
class BuiltinSampler:
    """A built-in sampler: one of the stepping rules of :func:`sample` with its x0 options
    (:class:`diffcore.X0Options`), DDIM's ``eta`` and Karras level spacing."""

    method: str
    x0_options: Any
    eta: float = 0.0
    karras: bool = False

    @property
    def schedule_as(self) -> str:
        return self.method

    @property
    def skip_layer_guidance(self) -> SkipLayerGuidance | None:
        """The config's skip-layer guidance (:class:`diffcore.builtin.samplers.SkipLayerOptions`),
        None when it names no layers."""
        c = self.x0_options
        if not c.skip_layers:
            return None
        return SkipLayerGuidance(
            tuple(int(i) for i in c.skip_layers), c.skip_layer_scale, c.skip_layer_start, c.skip_layer_stop
        )

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        schedule: SamplingSchedule,
        *,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        denoise = with_x0_options(denoise, schedule, self.x0_options)
        return sample(self.method, denoise, x, schedule, generator=generator, eta=self.eta, callback=callback)


def noise_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, from ``generator``: one generator for the batch, or
    one per row (so each image's noise depends on its own seed alone, whatever the batch size)."""
    if isinstance(generator, Sequence):
        return torch.cat([noise_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    # drawn on the generator's device so a seed gives the same sample on any accelerator
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


_noise = noise_like


def _posterior(a_t: float, s_t: float, a_s: float, s_s: float) -> float:
    """Variance of q(x_s | x_t, x0) for the cleaner level s after t."""
    if s_t == 0.0:
        return 0.0
    ratio = a_t / a_s if a_s > 0 else 0.0
    s_ts2 = max(s_t * s_t - ratio * ratio * s_s * s_s, 0.0)
    return s_s * s_s * s_ts2 / (s_t * s_t)


def _lambda(alpha: float, sigma: float) -> float:
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def sample(
    sampler: str,
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: SamplingSchedule,
    *,
    generator: Generators = None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run ``sampler`` from the start latent ``x`` (at level 0) to the end level; returns the latent.

    ``eta`` is DDIM's stochasticity (0 deterministic, 1 = DDPM posterior noise)."""
    name = canonical_sampler(sampler)
    x = x.to(torch.float32)
    al = schedule.alphas.tolist()
    sg = schedule.sigmas.tolist()
    lv = schedule.levels.tolist()
    n = schedule.steps
    history: list[torch.Tensor] = []
    for i in range(n):
        x0, eps = denoise(x, i)
        a_t, s_t, a_s, s_s = al[i], sg[i], al[i + 1], sg[i + 1]
        if name == "ddpm":
            var = _posterior(a_t, s_t, a_s, s_s)
            # posterior mean of x_s given x_t and x0, as coefficients on each
            ratio = a_t / a_s if a_s > 0 else 0.0
            s_ts2 = s_t * s_t - ratio * ratio * s_s * s_s
            c_x0 = a_s * s_ts2 / (s_t * s_t)
            c_xt = ratio * s_s * s_s / (s_t * s_t)
            x = c_x0 * x0 + c_xt * x
            if i < n - 1:
                x = x + math.sqrt(max(var, 1e-20)) * _noise(x, generator)
        elif name == "ddim":
            std = eta * math.sqrt(_posterior(a_t, s_t, a_s, s_s))
            x = a_s * x0 + math.sqrt(max(s_s * s_s - std * std, 0.0)) * eps
            if eta > 0:
                x = x + std * _noise(x, generator)
        elif name == "euler":
            y = schedule.to_native(x, i)
            d = (y - x0) / lv[i]
            x = schedule.from_native(y + (lv[i + 1] - lv[i]) * d, i + 1)
        elif name == "euler_a":
            x = _euler_ancestral(x, x0, eps, schedule, i, generator)
        elif name == "lcm":
            x0 = lcm_boundary(x0, x, schedule, i)
            # multistep consistency sampling: jump to x0, then re-noise to the next level with fresh
            # noise; the last step returns x0 and draws nothing (one-step sampling draws no noise)
            x = a_s * x0 + s_s * _noise(x, generator) if i < n - 1 else x0
        elif name == "heun":
            y = schedule.to_native(x, i)
            d = (y - x0) / lv[i]
            dt = lv[i + 1] - lv[i]
            if lv[i + 1] == 0.0 or i + 1 >= n:
                x = schedule.from_native(y + dt * d, i + 1)
            else:
                x_euler = schedule.from_native(y + dt * d, i + 1)
                x0_2, _ = denoise(x_euler, i + 1)
                d2 = (schedule.to_native(x_euler, i + 1) - x0_2) / lv[i + 1]
                x = schedule.from_native(y + dt * (d + d2) / 2, i + 1)
        else:
            x = _dpmpp_2m(x, x0, history, schedule, i)
        if callback is not None:
            callback(StepInfo(i, n, float(schedule.timesteps[i]), x, x0))
    return x


#: the consistency-model boundary condition of LCM (Luo et al. 2023): c_skip(t) x + c_out(t) x0 with
#: sigma_data 0.5 and the discrete timestep scaled by 10, the values diffusers' LCMScheduler uses
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


def lcm_scalings(t: Any) -> tuple[Any, Any]:
    """(c_skip, c_out) at discrete DDPM timestep(s) ``t``: c_skip is 1 and c_out 0 at t = 0, so the
    consistency function is the identity on clean data."""
    scaled = t * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def lcm_boundary(x0: torch.Tensor, x: torch.Tensor, schedule: SamplingSchedule, i: int) -> torch.Tensor:
    """The consistency function's output at level i: LCM's boundary-condition blend on DDPM-family
    schedules; on rectified flow x0 = x - s v already equals x at s = 0, so x0 as it is."""
    if schedule.kind != "ddpm":
        return x0
    c_skip, c_out = lcm_scalings(float(schedule.timesteps[i]))
    return c_out * x0 + c_skip * x


def _euler_ancestral(
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    schedule: SamplingSchedule,
    i: int,
    generator: Generators,
) -> torch.Tensor:
    noise = _noise(x, generator)
    a_t, s_t, a_s, s_s = (
        float(v)
        for v in (schedule.alphas[i], schedule.sigmas[i]) + (schedule.alphas[i + 1], schedule.sigmas[i + 1])
    )
    if schedule.kind == "ddpm":
        # k-diffusion: step down to sigma_down deterministically, add sigma_up of fresh noise
        hi, lo = float(schedule.levels[i]), float(schedule.levels[i + 1])
        up = math.sqrt(lo * lo * (hi * hi - lo * lo) / (hi * hi))
        down = math.sqrt(lo * lo - up * up)
        y = schedule.to_native(x, i)
        y = y + (down - hi) * ((y - x0) / hi) + up * noise
        return schedule.from_native(y, i + 1)
    # on a flow path the same step is the DDPM posterior draw (DDIM with eta = 1)
    std = math.sqrt(_posterior(a_t, s_t, a_s, s_s))
    return a_s * x0 + math.sqrt(max(s_s * s_s - std * std, 0.0)) * eps + std * noise


def _dpmpp_2m(
    x: torch.Tensor, x0: torch.Tensor, history: list[torch.Tensor], schedule: SamplingSchedule, i: int
) -> torch.Tensor:
    a_t, s_t = float(schedule.alphas[i + 1]), float(schedule.sigmas[i + 1])
    a_0, s_0 = float(schedule.alphas[i]), float(schedule.sigmas[i])
    n = schedule.steps
    # first-order (DDIM) coefficient alpha_t (1 - e^-h), written without logs so pure-noise and
    # clean end levels need no special case
    phi = a_t - a_0 * s_t / s_0
    first = i == 0 or not history
    # the last step is first order when it lands on clean data or the run is short (< 15 steps)
    last_low = i == n - 1 and (s_t == 0.0 or n < 15)
    if first or last_low:
        out = (s_t / s_0) * x + phi * x0
    else:
        a_1, s_1 = float(schedule.alphas[i - 1]), float(schedule.sigmas[i - 1])
        h = _lambda(a_t, s_t) - _lambda(a_0, s_0)
        h_0 = _lambda(a_0, s_0) - _lambda(a_1, s_1)
        inv_r = h / h_0 if math.isfinite(h_0) else 0.0
        out = (s_t / s_0) * x + phi * x0 + 0.5 * phi * inv_r * (x0 - history[-1])
    history[:] = [x0]
    return out


def run(
    sampler: str,
    denoise: Denoiser,
    noise: torch.Tensor,
    schedule: SamplingSchedule,
    *,
    generator: Generators = None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Start from ``noise`` scaled to the schedule's first level and sample (see :func:`sample`)."""
    x = noise.to(torch.float32) * schedule.init_noise_scale
    return sample(sampler, denoise, x, schedule, generator=generator, eta=eta, callback=callback)
