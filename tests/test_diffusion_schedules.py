"""Schedules, shifts, timestep sampling, loss weights and prediction conversions against their closed
forms and the diffusers reference."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

import diffcore
from diffcore.diffusion import objectives, schedules
from diffcore.diffusion.config import DDPMConfig, FlowConfig
from diffcore.diffusion.guidance import classifier_free_guidance
from diffcore.diffusion.scheduler import DDPMScheduler, FlowScheduler
from diffcore.diffusion.timesteps import cosmap_u, mode_u, sample_u
from diffcore.diffusion.weighting import flow_weight, min_snr_weight
from diffcore.errors import ConfigError
from diffcore.protocols import Scheduler


@pytest.mark.parametrize(
    ("schedule", "start", "end"),
    [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(schedule, start, end, zero_snr):
    ref = diffusers.DDPMScheduler(
        beta_schedule=schedule, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr
    )
    ours = DDPMScheduler(
        DDPMConfig(beta_schedule=schedule, beta_start=start, beta_end=end, rescale_zero_terminal_snr=zero_snr)
    )
    np.testing.assert_array_equal(ours.alphas_cumprod.float().numpy(), ref.alphas_cumprod.numpy())


def test_zero_terminal_snr_closed_form():
    betas = schedules.betas_for("scaled_linear", 1000, 0.00085, 0.012)
    before = schedules.alphas_cumprod(betas)
    after = schedules.alphas_cumprod(schedules.rescale_zero_terminal_snr(betas))
    assert after[-1].item() == 0.0
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-6)
    # sqrt(abar) is an affine map of the original: check the midpoint against it
    r0, rT, rm = before[0].sqrt(), before[-1].sqrt(), before[500].sqrt()
    expected = ((rm - rT) * r0 / (r0 - rT)) ** 2
    assert after[500].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("s", "k", "expected"), [(0.5, 3.0, 0.75), (0.25, 3.0, 0.5), (0.1, 1.0, 0.1), (1.0, 3.0, 1.0)]
)
def test_fixed_shift_closed_form(s, k, expected):
    assert schedules.fixed_shift(s, k) == pytest.approx(expected)


def test_time_shift_is_fixed_shift_with_exp_mu():
    s = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=torch.float64)
    for mu in (0.5, 1.15, math.log(3.0)):
        torch.testing.assert_close(schedules.time_shift(s, mu), schedules.fixed_shift(s, math.exp(mu)))


@pytest.mark.parametrize(
    ("seq", "mu"), [(256, 0.5), (4096, 1.15), (1024, 0.5 + 0.65 * 768 / 3840), (2176, 0.825)]
)
def test_flux1_mu_line(seq, mu):
    assert schedules.flux1_mu(seq) == pytest.approx(mu, rel=1e-12)


@pytest.mark.parametrize(("seq", "steps"), [(1024, 10), (1024, 200), (4096, 28), (4300, 50), (8192, 50)])
def test_flux2_empirical_mu(seq, steps):
    m10, m200 = 8.73809524e-05 * seq + 1.89833333, 0.00016927 * seq + 0.45666666
    if seq > 4300:
        expected = m200
    else:
        expected = m10 + (m200 - m10) * (steps - 10) / 190
    assert schedules.flux2_mu(seq, steps) == pytest.approx(expected, rel=1e-9)
    if steps in (10, 200) and seq <= 4300:
        assert schedules.flux2_mu(seq, steps) == pytest.approx(m10 if steps == 10 else m200, rel=1e-9)


def test_timestep_sampling_closed_forms():
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    scale = 1.29
    expected = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    torch.testing.assert_close(mode_u(u, scale), expected)
    assert mode_u(torch.tensor([0.5]), scale).item() == pytest.approx(0.5)
    torch.testing.assert_close(mode_u(u, 0.0), 1 - u)
    assert cosmap_u(torch.tensor([0.5])).item() == pytest.approx(0.5)
    assert cosmap_u(torch.tensor([1 / 3])).item() == pytest.approx(1 - 1 / (math.tan(math.pi / 6) + 1))


def test_logit_normal_moments():
    g = torch.Generator().manual_seed(0)
    u = sample_u(20000, g, "logit_normal", logit_mean=0.5, logit_std=0.8)
    z = torch.logit(u.double())
    assert z.mean().item() == pytest.approx(0.5, abs=0.03)
    assert z.std().item() == pytest.approx(0.8, abs=0.03)


def test_min_snr_weights_closed_form():
    snr = torch.tensor([0.1, 1.0, 5.0, 20.0])
    gamma = 5.0
    clipped = torch.tensor([0.1, 1.0, 5.0, 5.0])
    torch.testing.assert_close(min_snr_weight(snr, gamma, "eps"), clipped / snr)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "v"), clipped / (snr + 1))
    torch.testing.assert_close(min_snr_weight(snr, gamma, "x0"), clipped)
    zero = torch.tensor([0.0])  # the last step of a zero-terminal-SNR schedule
    assert min_snr_weight(zero, gamma, "eps").item() == 1.0 and min_snr_weight(zero, gamma, "v").item() == 0.0


def test_ddpm_loss_weight_uses_schedule_snr():
    sched = DDPMScheduler(DDPMConfig(min_snr_gamma=5.0))
    t = torch.tensor([10.0, 300.0, 999.0])
    abar = sched.alphas_cumprod[t.long()]
    snr = abar / (1 - abar)
    expected = torch.clamp(snr, max=5.0) / snr
    torch.testing.assert_close(sched.loss_weight(t, "eps").double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(DDPMScheduler().loss_weight(t, "eps"), torch.ones(3))


def test_flow_weightings_closed_form():
    s = torch.tensor([0.25, 0.5, 0.9])
    torch.testing.assert_close(flow_weight(s, "sigma_sqrt"), 1 / s**2)
    torch.testing.assert_close(flow_weight(torch.tensor([0.5]), "cosmap"), torch.tensor([4 / math.pi]))
    torch.testing.assert_close(flow_weight(s, "cosmap"), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    assert torch.equal(flow_weight(s, "none"), torch.ones(3))


@pytest.mark.parametrize("pt", objectives.PREDICTION_TYPES)
@pytest.mark.parametrize(("alpha", "sigma"), [(0.8, 0.6), (0.3, 0.7), (0.999, 0.02)])
def test_prediction_round_trips(pt, alpha, sigma):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    x = alpha * x0 + sigma * eps
    out = objectives.target(x0, eps, alpha, sigma, pt)
    got_x0, got_eps = objectives.to_x0_eps(out, x, alpha, sigma, pt)
    torch.testing.assert_close(got_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        objectives.to_velocity(out, x, alpha, sigma, pt), eps - x0, rtol=1e-4, atol=1e-4
    )
    for dest in objectives.PREDICTION_TYPES:
        converted = objectives.convert(out, x, alpha, sigma, pt, dest)
        torch.testing.assert_close(
            converted, objectives.target(x0, eps, alpha, sigma, dest), rtol=1e-4, atol=1e-4
        )


def test_ddpm_noise_and_velocity_match_diffusers():
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = DDPMScheduler()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 417, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t.float()), ref.add_noise(x0, noise, t))
    torch.testing.assert_close(ours.target(x0, noise, t.float(), "v"), ref.get_velocity(x0, noise, t))
    assert torch.equal(ours.target(x0, noise, t.float(), "eps"), noise)


def test_flow_training_path():
    sched = FlowScheduler(FlowConfig(shift=3.0))
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    s = torch.tensor([0.0, 0.3, 0.7, 1.0])
    noisy = sched.add_noise(x0, noise, s)
    torch.testing.assert_close(noisy[1], 0.7 * x0[1] + 0.3 * noise[1])
    torch.testing.assert_close(sched.target(x0, noise, s, "flow"), noise - x0)
    # logit-normal's median u = 0.5 lands on the shifted 0.75
    t = sched.sample_t(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    assert 0.0 < t.min().item() and t.max().item() < 1.0


def test_flow_dynamic_shift_training_times():
    sched = FlowScheduler(FlowConfig(dynamic_shift="flux1", timestep_sampling="uniform"))
    with pytest.raises(ValueError, match="seq_len"):
        sched.sample_t(4, torch.Generator(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    u = torch.rand(8, generator=g)
    t = sched.sample_t(8, torch.Generator().manual_seed(0), torch.device("cpu"), seq_len=4096)
    torch.testing.assert_close(t, schedules.time_shift(u.double(), 1.15).float())


def test_ddpm_training_times_are_discrete():
    for method in ("uniform", "logit_normal", "mode", "cosmap"):
        sched = DDPMScheduler(DDPMConfig(timestep_sampling=method))
        t = sched.sample_t(500, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert t.dtype == torch.float32 and torch.equal(t, t.floor())
        assert t.min() >= 0 and t.max() <= 999


def test_guidance_rescale_closed_form():
    g = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    guided = uncond + 7.5 * (cond - uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 7.5), guided)
    # Lin et al. (2023) eq. 15-16: x_rescaled = x_cfg * std(x_pos) / std(x_cfg), mixed by phi
    ours = classifier_free_guidance(cond, uncond, 7.5, 0.7)
    for b in range(2):
        rescaled = guided[b] * cond[b].std() / guided[b].std()
        torch.testing.assert_close(ours[b], 0.7 * rescaled + 0.3 * guided[b])


def test_scheduler_sections_build_and_reject_bad_keys():
    sched = diffcore.load_scheduler("flow", shift=3.0, weighting="cosmap", noise_offset=0.05)
    assert sched.kind == "flow" and sched.noise_offset == 0.05
    assert isinstance(sched, Scheduler)
    ddpm = diffcore.load_scheduler("ddpm", beta_schedule="linear", min_snr_gamma=5)
    assert ddpm.kind == "ddpm" and ddpm.config.min_snr_gamma == 5.0
    with pytest.raises(ConfigError, match="did you mean 'shift'"):
        diffcore.load_scheduler("flow", shfit=3.0)
    with pytest.raises(ConfigError, match="squaredcos_cap_v2"):
        diffcore.load_scheduler("ddpm", beta_schedule="cosine")


def test_scheduler_records_import_no_torch():
    import subprocess
    import sys

    code = "import sys; from diffcore.builtin.schedulers import records; records(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
