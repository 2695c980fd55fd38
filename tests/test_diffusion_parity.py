"""Sampler parity with the diffusers schedulers: same toy model, same noise, same generator seed.

Trajectories are compared in model space (the latent the model sees), where the Euler-family
reference keeps its state divided by alpha.
"""

from __future__ import annotations

import inspect
import math

import diffusers
import numpy as np
import pytest
import torch

from diffcore.diffusion.config import DDPMConfig, FlowConfig
from diffcore.diffusion.objectives import to_x0_eps
from diffcore.diffusion.samplers import run
from diffcore.diffusion.scheduler import DDPMScheduler, FlowScheduler

SHAPE = (2, 4, 8, 8)
ATOL = 1e-5
DIFFUSERS_PT = {"eps": "epsilon", "v": "v_prediction"}


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, t-dependent function standing in for a network."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.6 * x * torch.cos(t / 700.0) + 0.2 * torch.sin(3 * x) + 0.05 * torch.tanh(t / 500.0)


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def ours(scheduler, sampler, steps, prediction_type, *, time_scale=1.0, seed=1, **schedule_options):
    eta = schedule_options.pop("eta", 0.0)
    schedule = scheduler.sampling_schedule(steps, sampler, **schedule_options)
    traj = []

    def denoise(x, i):
        t = torch.tensor(float(schedule.timesteps[i]) * time_scale)
        out = toy_model(x, t)
        return to_x0_eps(out, x, float(schedule.alphas[i]), float(schedule.sigmas[i]), prediction_type)

    final = run(
        sampler,
        denoise,
        start_noise(),
        schedule,
        generator=torch.Generator().manual_seed(seed),
        eta=eta,
        callback=lambda info: traj.append(info.latents.clone()),
    )
    return schedule, traj, final


def theirs(sched, steps, *, ve=False, seed=1, set_kwargs=None, step_kwargs=None):
    sched.set_timesteps(steps, **(set_kwargs or {}))
    latents = start_noise() * getattr(sched, "init_noise_sigma", 1.0)
    gen = torch.Generator().manual_seed(seed)
    traj = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t) if hasattr(type(sched), "scale_model_input") else latents
        out = toy_model(inp, t.float())
        kwargs = dict(step_kwargs or {})
        if "generator" in inspect.signature(sched.step).parameters:
            kwargs["generator"] = gen
        latents = sched.step(out, t, latents, **kwargs).prev_sample
        if getattr(sched, "state_in_first_order", True):
            idx = sched.step_index if hasattr(sched, "step_index") else None
            if ve:
                sigma_next = float(sched.sigmas[idx]) if idx is not None else 0.0
                traj.append(latents / math.sqrt(sigma_next**2 + 1))
            else:
                traj.append(latents.clone())
    if not getattr(sched, "state_in_first_order", True):  # Heun's last step is a lone Euler step
        traj.append(latents.clone())
    return traj


def assert_traj(a, b, atol=ATOL):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        # within 1e-5, relative where the state is large (float32 carries ~7 digits)
        err = ((x - y).abs() / (1 + y.abs())).max().item()
        assert err < atol, f"step {i}: max scaled difference {err:.2e}"


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_matches_diffusers(prediction_type, spacing):
    ref = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type=DIFFUSERS_PT[prediction_type],
        timestep_spacing=spacing,
    )
    sched = DDPMScheduler(DDPMConfig(inference_spacing=spacing))
    schedule, traj, _ = ours(sched, "ddpm", 10, prediction_type)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(schedule.timesteps.numpy(), ref.timesteps.numpy())
    assert_traj(traj, theirs(ref, 10))


@pytest.mark.parametrize(
    ("prediction_type", "eta", "options"),
    [
        ("eps", 0.0, {}),
        ("v", 0.0, {}),
        ("eps", 0.5, {}),
        ("eps", 0.0, {"steps_offset": 1, "set_alpha_to_one": False}),
        ("v", 0.0, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ],
)
def test_ddim_matches_diffusers(prediction_type, eta, options):
    ref = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type=DIFFUSERS_PT[prediction_type],
        **options,
    )
    config = DDPMConfig(
        steps_offset=options.get("steps_offset", 0),
        rescale_zero_terminal_snr=options.get("rescale_betas_zero_snr", False),
    )
    final = "min" if options.get("set_alpha_to_one") is False else "zero"
    schedule, traj, _ = ours(DDPMScheduler(config), "ddim", 20, prediction_type, eta=eta, final=final)
    ref.set_timesteps(20)
    np.testing.assert_array_equal(schedule.timesteps.numpy(), ref.timesteps.numpy())
    assert_traj(traj, theirs(ref, 20, step_kwargs={"eta": eta}))


@pytest.mark.parametrize(
    ("prediction_type", "options"),
    [
        ("eps", {}),
        ("v", {}),
        ("eps", {"timestep_spacing": "leading", "steps_offset": 1}),
        ("eps", {"use_karras_sigmas": True}),
        ("v", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ],
)
def test_euler_matches_diffusers(prediction_type, options):
    ref = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=DIFFUSERS_PT[prediction_type],
        **options,
    )
    config = DDPMConfig(
        inference_spacing=options.get("timestep_spacing", "auto"),
        steps_offset=options.get("steps_offset", 0),
        rescale_zero_terminal_snr=options.get("rescale_betas_zero_snr", False),
    )
    karras = options.get("use_karras_sigmas", False)
    schedule, traj, _ = ours(DDPMScheduler(config), "euler", 12, prediction_type, karras=karras)
    ref.set_timesteps(12)
    np.testing.assert_allclose(schedule.timesteps.numpy(), ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(schedule.levels.numpy(), ref.sigmas.numpy(), rtol=1e-6)
    # at zero terminal SNR the reference's float32 state starts at sigma 4096, so its first step
    # cancels 4096 * 2^-24 per unit; that, not the math, bounds the agreement there
    zero_snr = options.get("rescale_betas_zero_snr", False)
    assert_traj(traj, theirs(ref, 12, ve=True), atol=3e-4 if zero_snr else ATOL)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_euler_ancestral_matches_diffusers(prediction_type):
    ref = diffusers.EulerAncestralDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=DIFFUSERS_PT[prediction_type],
    )
    schedule, traj, _ = ours(DDPMScheduler(), "euler_a", 15, prediction_type, seed=7)
    assert_traj(traj, theirs(ref, 15, ve=True, seed=7))


@pytest.mark.parametrize(("prediction_type", "karras"), [("eps", False), ("v", False), ("eps", True)])
def test_heun_matches_diffusers(prediction_type, karras):
    ref = diffusers.HeunDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=DIFFUSERS_PT[prediction_type],
        use_karras_sigmas=karras,
    )
    schedule, traj, _ = ours(DDPMScheduler(), "heun", 8, prediction_type, karras=karras)
    ref.set_timesteps(8)
    ref_levels = torch.cat([ref.sigmas[::2], ref.sigmas[-1:]])
    np.testing.assert_allclose(schedule.levels.numpy(), ref_levels.numpy(), rtol=1e-6)
    assert_traj(traj, theirs(ref, 8, ve=True))


@pytest.mark.parametrize(
    ("prediction_type", "steps", "options"),
    [
        ("eps", 10, {}),
        ("v", 10, {}),
        ("eps", 20, {}),
        ("eps", 12, {"use_karras_sigmas": True}),
        ("eps", 20, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
        ("eps", 10, {"timestep_spacing": "leading", "steps_offset": 1}),
        ("v", 10, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ],
)
def test_dpmpp_2m_matches_diffusers(prediction_type, steps, options):
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=DIFFUSERS_PT[prediction_type],
        **options,
    )
    config = DDPMConfig(
        inference_spacing=options.get("timestep_spacing", "auto"),
        steps_offset=options.get("steps_offset", 0),
        rescale_zero_terminal_snr=options.get("rescale_betas_zero_snr", False),
    )
    final = "min" if options.get("final_sigmas_type") == "sigma_min" else "zero"
    schedule, traj, _ = ours(
        DDPMScheduler(config),
        "dpmpp_2m",
        steps,
        prediction_type,
        karras=options.get("use_karras_sigmas", False),
        final=final,
    )
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(schedule.timesteps.numpy(), ref.timesteps.numpy())
    np.testing.assert_allclose(schedule.levels.numpy(), ref.sigmas.numpy(), rtol=1e-6)
    assert_traj(traj, theirs(ref, steps))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers_fixed_shift(shift):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule, traj, _ = ours(FlowScheduler(FlowConfig(shift=shift)), "euler", 10, "flow", time_scale=1000.0)
    ref.set_timesteps(10)
    np.testing.assert_allclose(schedule.levels.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(schedule.timesteps.numpy() * 1000, ref.timesteps.numpy(), rtol=1e-6)
    assert_traj(traj, theirs(ref, 10))


@pytest.mark.parametrize(
    ("dynamic", "seq_len"), [("flux1", 1024), ("flux1", 4096), ("flux2", 1024), ("flux2", 6000)]
)
def test_flow_euler_matches_diffusers_dynamic_shift(dynamic, seq_len):
    # mu itself is checked against its closed forms in test_diffusion_schedules (importing the
    # diffusers Flux pipelines to call theirs would pull in transformers)
    steps = 12
    sched = FlowScheduler(FlowConfig(dynamic_shift=dynamic))
    mu = sched.mu(seq_len, steps)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    schedule, traj, _ = ours(sched, "euler", steps, "flow", time_scale=1000.0, seq_len=seq_len)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    np.testing.assert_allclose(schedule.levels.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    sched_ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    assert_traj(traj, theirs(sched_ref, None, set_kwargs={"sigmas": sigmas, "mu": mu}))


def test_flow_euler_matches_diffusers_flux_spacing_without_dynamic_shift():
    # Flux.1 schnell: no shift, but the pipeline's linspace(1, 1/steps) sigmas
    steps = 4
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched = FlowScheduler(FlowConfig(shift=1.0, sigma_spacing="flux"))
    schedule, traj, _ = ours(sched, "euler", steps, "flow", time_scale=1000.0)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ref.set_timesteps(sigmas=sigmas)
    np.testing.assert_allclose(schedule.levels.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    assert_traj(traj, theirs(ref, None, set_kwargs={"sigmas": sigmas}))
