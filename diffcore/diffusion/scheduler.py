"""The objects the ``scheduler`` job section builds (the Scheduler protocol of diffcore.protocols).

Both kinds describe a Gaussian path x_t = alpha x0 + sigma noise; training asks them for times,
noisy samples, targets and weights, sampling asks for a :class:`SamplingSchedule`.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from diffcore.diffusion import objectives, schedules
from diffcore.diffusion.config import DDPMConfig, FlowConfig
from diffcore.diffusion.timesteps import sample_u
from diffcore.diffusion.weighting import flow_weight, min_snr_weight

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "lcm")
ALIASES = {
    "flow_euler": "euler",
    "dpmpp_2m_karras": "dpmpp_2m",
    "dpm++_2m": "dpmpp_2m",
    "euler_ancestral": "euler_a",
}


def canonical_sampler(name: str) -> str:
    """The sampler a (possibly aliased) name selects; ValueError for an unknown one."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS + tuple(ALIASES))}")
    return key


@attrs.frozen
class SamplingSchedule:
    """The noise levels one sampling run walks through (all float64, level n is the end).

    ``alphas``/``sigmas`` (n + 1): path coefficients of each level in model space;
    ``levels`` (n + 1): the schedule's native noise level (VE sigma for ddpm, s for flow), in which
    the Euler-family samplers take their steps; ``timesteps`` (n): the model time passed to
    ``predict`` at each level; ``init_noise_scale``: the start latent is noise times this.
    """

    kind: Literal["ddpm", "flow"]
    alphas: torch.Tensor
    sigmas: torch.Tensor
    levels: torch.Tensor
    timesteps: torch.Tensor
    init_noise_scale: float = 1.0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def to_native(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x_t in the native coordinates of level i (VE x_t / alpha for ddpm, unchanged for flow)."""
        return x / float(self.alphas[i]) if self.kind == "ddpm" else x

    def from_native(self, y: torch.Tensor, i: int) -> torch.Tensor:
        return y * float(self.alphas[i]) if self.kind == "ddpm" else y


class DDPMScheduler:
    """Discrete-time DDPM-family schedule; model time is the timestep in [0, T)."""

    kind: Literal["ddpm"] = "ddpm"

    def __init__(self, config: DDPMConfig | None = None):
        self.config = config or DDPMConfig()
        c = self.config
        betas = schedules.betas_for(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end)
        if c.rescale_zero_terminal_snr:
            betas = schedules.rescale_zero_terminal_snr(betas)
        self.num_train_timesteps = c.num_train_timesteps
        self.betas = betas.to(torch.float64)
        self.alphas_cumprod = schedules.alphas_cumprod(betas)
        self.noise_offset = c.noise_offset
        # sampling divides by alpha, so a zero-SNR last step gets a tiny floor there (not in training)
        self._sampling_abar = self.alphas_cumprod.clamp(min=schedules.ZERO_SNR_FLOOR)
        self.ve_table = schedules.ve_sigmas(self._sampling_abar)

    # -- training ---------------------------------------------------------------------------------
    def sample_t(
        self, n: int, generator: torch.Generator, device: torch.device, seq_len: int | None = None
    ) -> torch.Tensor:
        c = self.config
        T = c.num_train_timesteps
        if c.timestep_sampling == "uniform":
            gdev = generator.device if generator is not None else torch.device("cpu")
            t = torch.randint(0, T, (n,), generator=generator, device=gdev)
        else:
            u = sample_u(
                n,
                generator,
                c.timestep_sampling,
                logit_mean=c.logit_mean,
                logit_std=c.logit_std,
                mode_scale=c.mode_scale,
            )
            # u near 1 is high noise, as for flow sigmas; discretise onto [0, T)
            t = (u * T).floor().clamp(0, T - 1)
        return t.to(device=device, dtype=torch.float32)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Path coefficients (float32, shape of t) at model time t; fractional t interpolates the
        VE sigma linearly, as the Euler-family samplers do."""
        t = torch.as_tensor(t)
        if torch.is_floating_point(t) and not torch.equal(t, t.round()):
            ve = schedules.interp_table(t.cpu(), self.ve_table)
            alpha = (1 + ve**2) ** -0.5
            return alpha.to(t.device, torch.float32), (ve * alpha).to(t.device, torch.float32)
        abar = self.alphas_cumprod[t.cpu().long()]
        return abar.sqrt().to(t.device, torch.float32), (1 - abar).sqrt().to(t.device, torch.float32)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.alpha_sigma(t)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha.to(like.dtype).reshape(shape), sigma.to(like.dtype).reshape(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
    ) -> torch.Tensor:
        alpha, sigma = self._coefficients(t, x0)
        return objectives.target(x0, noise, alpha, sigma, prediction_type)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha^2 / sigma^2 at model time t (float32)."""
        alpha, sigma = self.alpha_sigma(t)
        return (alpha.double() ** 2 / (sigma.double() ** 2)).float()

    def loss_weight(self, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        if self.config.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device, dtype=torch.float32)
        return min_snr_weight(self.snr(t), self.config.min_snr_gamma, prediction_type).to(t.device)

    # -- sampling ---------------------------------------------------------------------------------
    def default_spacing(self, sampler: str) -> str:
        if self.config.inference_spacing != "auto":
            return self.config.inference_spacing
        if self.config.rescale_zero_terminal_snr:
            return "trailing"
        return "leading" if sampler in ("ddpm", "ddim") else "linspace"

    def sampling_schedule(
        self,
        steps: int,
        sampler: str = "euler",
        *,
        seq_len: int | None = None,
        spacing: str | None = None,
        karras: bool = False,
        final: Literal["zero", "min"] = "zero",
    ) -> SamplingSchedule:
        """The levels ``sampler`` walks in ``steps`` steps. ``final`` "min" ends at the first training
        timestep's noise level instead of clean data; ``karras`` spaces levels per Karras et al."""
        sampler = canonical_sampler(sampler)
        if steps < 1:
            raise ValueError("steps must be at least 1")
        spacing = spacing or self.default_spacing(sampler)
        multistep = sampler == "dpmpp_2m"
        if sampler == "lcm":  # the distillation grid, whatever the configured spacing
            t = schedules.lcm_timesteps(self.num_train_timesteps, steps)
        else:
            t = schedules.discrete_timesteps(
                self.num_train_timesteps, steps, spacing, self.config.steps_offset, multistep=multistep
            )
        if sampler in ("ddpm", "ddim", "dpmpp_2m"):
            t = t.round()
        table = self.ve_table
        if karras:
            levels = schedules.karras_sigmas(float(table[0]), float(table[-1]), steps)
            t = schedules.sigma_to_t(levels, table)
            if multistep and self.config.beta_schedule != "squaredcos_cap_v2":
                t = t.round()
        else:
            levels = schedules.interp_table(t, table)
        last = float(table[0]) if final == "min" else 0.0
        levels = torch.cat([levels, torch.tensor([last], dtype=torch.float64)])
        alphas = (1 + levels**2) ** -0.5
        sigmas = levels * alphas
        if sampler in ("ddpm", "ddim", "lcm") and not karras:
            # these step in (alpha, sigma) directly, so a zero-SNR first step stays exactly pure noise
            abar = self.alphas_cumprod[t.long()]
            end = self.alphas_cumprod[:1] if final == "min" else torch.ones(1, dtype=torch.float64)
            abar = torch.cat([abar, end])
            alphas, sigmas = abar.sqrt(), (1 - abar).sqrt()
            levels = sigmas / alphas
        # Euler-family samplers start at the marginal of the first level without the data term
        # ("linspace"/"trailing"), the others at unit variance: the reference pipelines' convention.
        init = float(sigmas[0]) if sampler in ("euler", "euler_a", "heun") and spacing != "leading" else 1.0
        return SamplingSchedule("ddpm", alphas, sigmas, levels, t, init)


class FlowScheduler:
    """Rectified flow: x_s = (1 - s) x0 + s noise; model time is sigma s in [0, 1]."""

    kind: Literal["flow"] = "flow"

    def __init__(self, config: FlowConfig | None = None):
        self.config = config or FlowConfig()
        self.noise_offset = self.config.noise_offset
        self.num_train_timesteps = self.config.num_train_timesteps

    def mu(self, seq_len: int | None, steps: int | None = None) -> float | None:
        """The resolution-dependent shift exponent (None for a fixed shift)."""
        c = self.config
        if c.dynamic_shift == "none":
            return None
        if seq_len is None:
            raise ValueError(f"dynamic_shift {c.dynamic_shift!r} needs the latent sequence length (seq_len)")
        if c.dynamic_shift == "flux1":
            return schedules.flux1_mu(seq_len, c.base_seq_len, c.max_seq_len, c.base_shift, c.max_shift)
        return schedules.flux2_mu(seq_len, steps)

    def shift(self, s: torch.Tensor, seq_len: int | None = None, steps: int | None = None) -> torch.Tensor:
        """Map unshifted sigmas through the configured (fixed or resolution-dependent) shift."""
        mu = self.mu(seq_len, steps)
        if mu is None:
            return schedules.fixed_shift(s, self.config.shift)
        return schedules.time_shift(s, mu)

    # -- training ---------------------------------------------------------------------------------
    def sample_t(
        self, n: int, generator: torch.Generator, device: torch.device, seq_len: int | None = None
    ) -> torch.Tensor:
        c = self.config
        u = sample_u(
            n,
            generator,
            c.timestep_sampling,
            logit_mean=c.logit_mean,
            logit_std=c.logit_std,
            mode_scale=c.mode_scale,
        )
        return self.shift(u.double(), seq_len).float().to(device)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=torch.float32)
        return 1 - t, t

    def _s(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._s(t, x0)
        return (1 - s) * x0 + s * noise

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
    ) -> torch.Tensor:
        s = self._s(t, x0)
        return objectives.target(x0, noise, 1 - s, s, prediction_type)

    def loss_weight(self, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        return flow_weight(t.float(), self.config.weighting)

    # -- sampling ---------------------------------------------------------------------------------
    def sampling_schedule(
        self,
        steps: int,
        sampler: str = "euler",
        *,
        seq_len: int | None = None,
        spacing: str | None = None,
        karras: bool = False,
        final: Literal["zero", "min"] = "zero",
    ) -> SamplingSchedule:
        """Sigmas from 1 down to 0 in ``steps`` steps, shifted as configured.

        ``sigma_spacing`` "sd3" spaces the unshifted sigmas from 1 to shift(1/T) (the SD3 reference
        scheduler), "flux" from 1 to 1/steps (the Flux pipelines); "auto" takes "flux" with a
        resolution-dependent shift.
        """
        canonical_sampler(sampler)
        if karras:
            raise ValueError("Karras sigmas apply to DDPM-family schedules, not rectified flow")
        if steps < 1:
            raise ValueError("steps must be at least 1")
        T = self.config.num_train_timesteps
        spacing = self.config.sigma_spacing
        if spacing == "auto":
            spacing = "sd3" if self.config.dynamic_shift == "none" else "flux"
        if spacing == "sd3":
            end = float(schedules.fixed_shift(1.0 / T, self.config.shift))
            base = torch.linspace(1.0, end, steps, dtype=torch.float64)
        else:
            base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        s = self.shift(base, seq_len, steps)
        last = float(s[-1]) if final == "min" else 0.0
        levels = torch.cat([s, torch.tensor([last], dtype=torch.float64)])
        return SamplingSchedule("flow", 1 - levels, levels.clone(), levels, s.clone(), 1.0)


def make_scheduler(config: DDPMConfig | FlowConfig) -> DDPMScheduler | FlowScheduler:
    """Build the scheduler a config describes."""
    return FlowScheduler(config) if isinstance(config, FlowConfig) else DDPMScheduler(config)
