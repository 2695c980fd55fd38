"""Samplers against a Gaussian mixture whose exact denoiser is known in closed form.

Data: two isotropic Gaussians in 2-D (latents of shape (2, 1, 1)). For x_t = alpha x0 + sigma eps the
posterior mean is a responsibility-weighted sum of per-component Wiener filters; the toy model returns
it in whatever prediction type it claims, through :func:`diffcore.sampling.generate`.
"""

from __future__ import annotations

import pytest
import torch

from diffcore.diffusion import objectives
from diffcore.diffusion.config import DDPMConfig, FlowConfig
from diffcore.diffusion.scheduler import DDPMScheduler, FlowScheduler
from diffcore.model import DiffusionModel
from diffcore.sampling import generate

WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([[-2.0, 1.0], [1.5, -1.0]], dtype=torch.float64)
STD = 0.5
N = 1500


def true_moments() -> tuple[torch.Tensor, torch.Tensor]:
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    second = sum(
        w * (STD**2 * torch.eye(2, dtype=torch.float64) + torch.outer(m, m)) for w, m in zip(WEIGHTS, MEANS)
    )
    return mean, second - torch.outer(mean, mean)


class MixtureModel(DiffusionModel):
    """The exact denoiser of the mixture (optionally of one component: labels >= 0), as a model."""

    latent_channels = 2
    latent_downscale = 1

    def __init__(self, scheduler, prediction_type: str):
        super().__init__(torch.nn.Linear(1, 1))
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.calls = 0

    def encode_conditions(self, batch):
        return torch.as_tensor(batch["labels"])

    def null_batch(self, batch):
        return {"labels": torch.full_like(torch.as_tensor(batch["labels"]), -1)}

    def decode_latents(self, latents):
        return latents

    def predict(self, x, t, cond, **extra):
        self.calls += 1
        alpha, sigma = (v.double()[:, None] for v in self.scheduler.alpha_sigma(t))
        z = x.double().flatten(1)
        var = alpha**2 * STD**2 + sigma**2  # (B, 1)
        diff = z[:, None, :] - alpha[:, :, None] * MEANS[None]  # (B, K, 2)
        logits = WEIGHTS.log()[None] - (diff**2).sum(-1) / (2 * var) - torch.log(var)
        labels = cond.to(torch.long)
        one = torch.nn.functional.one_hot(labels.clamp(min=0), 2).bool()
        logits = torch.where((labels[:, None] >= 0) & ~one, -torch.inf, logits)
        resp = logits.softmax(-1)
        filtered = MEANS[None] + (alpha * STD**2 / var)[:, :, None] * diff
        x0 = (resp[:, :, None] * filtered).sum(1)
        eps = (z - alpha * x0) / sigma
        out = objectives.target(x0, eps, alpha, sigma, self.prediction_type)
        return out.reshape(x.shape).float()


def draw(model, scheduler, sampler, steps, *, labels=None, seed=0, n=N, **options):
    labels = torch.full((n,), -1) if labels is None else labels
    out = generate(
        model,
        scheduler,
        batch={"labels": labels},
        height=1,
        width=1,
        steps=steps,
        sampler=sampler,
        seed=seed,
        return_latents=True,
        **options,
    )
    return out.double().flatten(1)


# Steps at which each sampler's bias on the mode width is under 10% (15% for the ancestral samplers,
# which under-disperse at coarse steps); DPM-Solver++(2M) runs with Karras sigmas on DDPM-family schedules.
ANCESTRAL = ("ddpm", "euler_a")
STEPS = {"ddpm": 50, "ddim": 50, "euler": 50, "euler_a": 50, "heun": 20, "dpmpp_2m": 20}
NATIVE = [(kind, sampler) for kind in ("ddpm", "flow") for sampler in STEPS]
OTHER_PREDICTIONS = (
    [("ddpm", pt, "euler") for pt in ("v", "x0", "flow")]
    + [("ddpm", "v", "ddpm")]
    + [("flow", pt, "euler") for pt in ("v", "x0")]
)


def make_scheduler(kind):
    return DDPMScheduler(DDPMConfig()) if kind == "ddpm" else FlowScheduler(FlowConfig(shift=1.0))


def check_moments(samples, width_rtol=0.1):
    mean, cov = true_moments()
    got_cov = torch.cov(samples.T)
    # Monte Carlo error at N = 1500: ~0.04 on the mean, ~0.1 on the largest covariance entry
    assert torch.allclose(samples.mean(0), mean, atol=0.12), (samples.mean(0), mean)
    assert torch.allclose(got_cov, cov, atol=0.1, rtol=0.1), (got_cov, cov)
    # the modes keep their weights and, within 10% (15% for ancestral samplers), their width
    first = (samples - MEANS[0]).norm(dim=1) < (samples - MEANS[1]).norm(dim=1)
    assert first.double().mean().item() == pytest.approx(WEIGHTS[0].item(), abs=0.035)
    for k, members in enumerate((first, ~first)):
        width = (samples[members] - MEANS[k]).std(0)
        assert torch.allclose(width, torch.full_like(width, STD), rtol=width_rtol), (k, width)


@pytest.mark.parametrize(("kind", "sampler"), NATIVE)
def test_samplers_reproduce_mixture_moments(kind, sampler):
    scheduler = make_scheduler(kind)
    model = MixtureModel(scheduler, "eps" if kind == "ddpm" else "flow")
    steps = 50 if (kind, sampler) == ("flow", "dpmpp_2m") else STEPS[sampler]
    name = "dpmpp_2m_karras" if (kind, sampler) == ("ddpm", "dpmpp_2m") else sampler
    check_moments(draw(model, scheduler, name, steps), 0.15 if sampler in ANCESTRAL else 0.1)


@pytest.mark.parametrize(("kind", "prediction_type", "sampler"), OTHER_PREDICTIONS)
def test_every_prediction_type_drives_the_samplers(kind, prediction_type, sampler):
    scheduler = make_scheduler(kind)
    samples = draw(MixtureModel(scheduler, prediction_type), scheduler, sampler, STEPS[sampler])
    check_moments(samples, 0.15 if sampler in ANCESTRAL else 0.1)


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_dpmpp_2m_beats_euler_at_ten_steps(kind):
    scheduler = make_scheduler(kind)
    model = MixtureModel(scheduler, "eps" if kind == "ddpm" else "flow")
    karras = kind == "ddpm"
    errors = {}
    for sampler in ("euler", "dpmpp_2m"):
        # the ODE solution from the same start noise, solved finely with the same start convention
        reference = draw(model, scheduler, sampler, 100, karras=karras, n=500)
        coarse = draw(model, scheduler, sampler, 10, karras=karras, n=500)
        errors[sampler] = (coarse - reference).pow(2).sum(1).mean().item()
    # with Karras sigmas the second-order solver halves Euler's error; on the flow schedule (uniform in
    # s, so one long last interval in log-SNR) the margin is smaller
    assert errors["dpmpp_2m"] < (0.5 if karras else 0.9) * errors["euler"], errors


def test_guidance_toward_a_component():
    scheduler = DDPMScheduler()
    model = MixtureModel(scheduler, "v")
    labels = torch.zeros(1000, dtype=torch.long)
    cond = draw(model, scheduler, "heun", 20, labels=labels, guidance=1.0)
    # the schedule's last timestep is not pure noise; starting from noise alone shifts the mean by about
    # mu * STD / sigma_max = 0.034 mu
    assert torch.allclose(cond.mean(0), MEANS[0], atol=0.1)
    assert torch.allclose(cond.std(0), torch.full((2,), STD, dtype=torch.float64), rtol=0.1)
    # guidance > 1 samples p(x|c)^g / p(x)^(g-1): where the other mode is far that is the class itself,
    # so the samples move away from the other mode
    calls = model.calls
    guided = draw(model, scheduler, "heun", 20, labels=labels, guidance=3.0)
    assert model.calls - calls == 2 * 39  # conditional and unconditional per model evaluation
    assert (guided - MEANS[1]).norm(dim=1).mean() > (cond - MEANS[1]).norm(dim=1).mean() + 0.05
