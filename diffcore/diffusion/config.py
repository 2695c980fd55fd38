"""The ``scheduler`` job section's configs (torch-free: plugin discovery imports them)."""

from __future__ import annotations

from typing import Literal

import attrs

TimestepSampling = Literal["uniform", "logit_normal", "mode", "cosmap"]


@attrs.define(kw_only=True)
class DDPMConfig:
    """A DDPM-family schedule: discrete timesteps in [0, T), betas from a named schedule."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_zero_terminal_snr: bool = False
    timestep_sampling: TimestepSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    #: how inference timesteps are spaced; "auto" takes each sampler's usual spacing ("trailing" when
    #: the schedule is rescaled to zero terminal SNR)
    inference_spacing: Literal["auto", "leading", "trailing", "linspace"] = "auto"
    #: added to "leading" timesteps (SD 1.x/2.x and SDXL ship with 1)
    steps_offset: int = 0


@attrs.define(kw_only=True)
class FlowConfig:
    """Rectified flow: x_s = (1 - s) x0 + s noise, sigma s in [0, 1], target noise - x0."""

    shift: float = 1.0
    dynamic_shift: Literal["none", "flux1", "flux2"] = "none"
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    timestep_sampling: TimestepSampling = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    num_train_timesteps: int = 1000
    noise_offset: float = 0.0
    #: how inference sigmas are spaced before the shift: "flux" linspace(1, 1/steps) (the Flux
    #: pipelines, schnell included), "sd3" linspace(1, shift(1/T)) (the SD3 reference scheduler);
    #: "auto" is "flux" with a dynamic shift, else "sd3"
    sigma_spacing: Literal["auto", "flux", "sd3"] = "auto"
