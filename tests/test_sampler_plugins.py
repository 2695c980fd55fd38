"""Samplers as plugins: x0 clipping and dynamic thresholding, a third-party sampler used by name,
and unknown names."""

from __future__ import annotations

import attrs
import pytest
import torch

import diffcore
from diffcore.diffusion.config import DDPMConfig
from diffcore.diffusion.samplers import threshold_x0, with_x0_options
from diffcore.diffusion.scheduler import DDPMScheduler, FlowScheduler
from diffcore.model import DiffusionModel
from diffcore.registry import PluginInfo, build_registry, set_registry
from diffcore.sampling import build_sampler, generate

PATTERN = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
OVERSHOOT = 1.6


class Overshooting(DiffusionModel):
    """A pixel-space eps model whose implied x0 is the data times 1.6: an analytic stand-in for a
    network whose eps error at high noise turns into an x0 overshoot."""

    prediction_type = "eps"

    def __init__(self, scheduler):
        super().__init__(torch.nn.Linear(1, 1), latent_channels=1)
        self.scheduler = scheduler
        self.calls = 0

    def encode_conditions(self, batch):
        return None

    def predict(self, noisy_latents, t, cond, **extra):
        self.calls += 1
        alpha, sigma = self.scheduler.alpha_sigma(t)
        a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        return (noisy_latents - a * OVERSHOOT * PATTERN) / s


def draw(sampler, options=None, scheduler=None, steps=8):
    scheduler = scheduler or DDPMScheduler(DDPMConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    model = Overshooting(scheduler)
    return generate(
        model, scheduler, batch={"labels": torch.zeros(2)}, height=4, width=4, steps=steps,
        sampler=sampler, sampler_options=options, guidance=1.0, return_latents=True,
    )


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "heun"])
def test_clip_x0_and_dynamic_thresholding_tame_an_overshooting_eps_model(sampler):
    plain = draw(sampler)
    # deterministic samplers land on the last x0 estimate: the overshoot, out of the image range
    torch.testing.assert_close(plain, (OVERSHOOT * PATTERN).expand_as(plain), atol=1e-4, rtol=1e-4)
    clipped = draw(sampler, {"clip_x0": 1.0})
    torch.testing.assert_close(clipped, (OVERSHOOT * PATTERN).clamp(-1, 1).expand_as(plain), atol=1e-4, rtol=1e-4)
    # dynamic thresholding rescales instead of saturating: the pattern comes back, not a clipped one
    dynamic = draw(sampler, {"dynamic_threshold": 0.995})
    assert dynamic.abs().max() <= 1.0 + 1e-5
    torch.testing.assert_close(dynamic, PATTERN.expand_as(plain), atol=0.02, rtol=0)
    capped = draw(sampler, {"dynamic_threshold": 0.995, "threshold_max": 1.25})
    expected = (OVERSHOOT * PATTERN).clamp(-1.25, 1.25) / 1.25
    torch.testing.assert_close(capped, expected.expand_as(plain), atol=1e-4, rtol=1e-4)


def test_threshold_x0_follows_the_imagen_rule():
    x0 = torch.stack([PATTERN[0] * 3.0, PATTERN[0] * 0.5])
    out = threshold_x0(x0, percentile=1.0)
    # s = max |x0| per sample, at least 1: the first is divided by 3, the second left alone
    torch.testing.assert_close(out, torch.stack([PATTERN[0], PATTERN[0] * 0.5]))
    assert torch.equal(threshold_x0(x0, clip=0.25), x0.clamp(-0.25, 0.25))


def test_x0_options_keep_eps_consistent_with_the_new_x0():
    schedule = DDPMScheduler().sampling_schedule(4, "ddim")
    x = torch.randn(1, 1, 4, 4)

    def denoise(x, i):
        return 2.0 * PATTERN, torch.zeros_like(x)

    x0, eps = with_x0_options(denoise, schedule, diffcore.X0Options(clip_x0=1.0))(x, 1)
    a, s = float(schedule.alphas[1]), float(schedule.sigmas[1])
    torch.testing.assert_close(x0, (2.0 * PATTERN).clamp(-1, 1))
    torch.testing.assert_close(a * x0 + s * eps, x)


def test_dpmpp_2m_karras_alias_and_ddim_eta_through_options():
    karras = build_sampler("dpmpp_2m_karras")
    assert (karras.schedule_as, karras.karras) == ("dpmpp_2m", True)
    assert build_sampler("DPM++_2M").schedule_as == "dpmpp_2m"
    assert build_sampler("ddim", eta=0.5).eta == 0.5
    assert build_sampler("ddim", {"eta": 1.0}, eta=0.5).eta == 1.0
    assert build_sampler("euler", eta=0.5).schedule_as == "euler"  # eta only where the config has it


def test_unknown_sampler_and_bad_options_are_user_errors():
    with pytest.raises(diffcore.UserError) as err:
        build_sampler("plms", where="--sampler")
    message = str(err.value)
    assert message.startswith("--sampler: unknown sampler 'plms'; installed: ddim, ddpm, dpm++_2m")
    assert "euler_a" in message and "heun" in message
    with pytest.raises(diffcore.ConfigError, match=r"--sampler\.clip_x0: invalid value \(must be positive"):
        build_sampler("euler", {"clip_x0": -1}, where="--sampler")
    with pytest.raises(diffcore.ConfigError, match="--sampler.karras"):
        build_sampler("euler", {"karras": True}, where="--sampler")


def test_cli_sampler_errors_exit_2_before_loading_anything(tmp_path, capsys):
    from diffcore.cli import main

    base = ["sample", "--from", str(tmp_path / "nowhere"), "--label", "1"]
    assert main([*base, "--sampler", "plms"]) == 2
    assert capsys.readouterr().err.startswith("diffcore: error: --sampler: unknown sampler 'plms'")
    assert main([*base, "--sampler", "ddim", "--sampler-option", "dynamic_threshold=2"]) == 2
    assert "--sampler.dynamic_threshold: invalid value (must be a fraction" in capsys.readouterr().err


# -- a third-party sampler ------------------------------------------------------------------------
@attrs.define(kw_only=True)
class JumpConfig(diffcore.X0Options):
    #: which level to jump from
    level: int = 1


@attrs.frozen
class Jump:
    """Returns the denoised estimate of one level: one model call."""

    config: JumpConfig
    schedule_as: str = "euler"
    karras: bool = False

    def __call__(self, denoise, x, schedule, *, generator=None, callback=None):
        x0, _ = with_x0_options(denoise, schedule, self.config)(x, self.config.level)
        return x0


class JumpPlugin:
    @diffcore.hookimpl
    def diffcore_register_samplers(self):
        return [diffcore.SamplerSpec(name="jump", config=JumpConfig, factory=Jump, description="one step")]


@pytest.fixture
def with_jump():
    registry = build_registry(autoload=False)
    registry.register(JumpPlugin(), PluginInfo(name="jump", distribution="diffcore-jump", version="1.0"))
    set_registry(registry)
    yield registry
    set_registry(None)


def test_third_party_sampler_registered_in_process_is_usable_by_name(with_jump):
    assert with_jump.get("sampler", "jump").distribution == "diffcore-jump"
    scheduler = FlowScheduler()
    model = Overshooting(scheduler)
    out = generate(
        model, scheduler, batch={"labels": torch.zeros(3)}, height=4, width=4, steps=5,
        sampler="jump", sampler_options={"clip_x0": 1.0, "level": 2}, guidance=1.0, return_latents=True,
    )
    assert model.calls == 1
    torch.testing.assert_close(out, (OVERSHOOT * PATTERN).clamp(-1, 1).expand(3, 1, 4, 4), atol=1e-5, rtol=1e-5)
    # the same sampler can be handed over built (level 1: an eps model says nothing at pure noise)
    built = Jump(JumpConfig(level=1))
    again = generate(model, scheduler, batch={"labels": torch.zeros(1)}, height=4, width=4, steps=5,
                     sampler=built, guidance=1.0, return_latents=True)
    torch.testing.assert_close(again, OVERSHOOT * PATTERN, atol=1e-5, rtol=1e-5)
