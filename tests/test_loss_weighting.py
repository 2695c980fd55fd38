"""Loss weightings chosen with train.loss_weighting, independently of the noise schedule."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore.api import build_component, build_loss_weighting
from diffcore.config.job import structure_job
from diffcore.diffusion.config import DDPMConfig, FlowConfig
from diffcore.diffusion.scheduler import DDPMScheduler, FlowScheduler
from diffcore.errors import ConfigError

DDPM_T = torch.tensor([0.0, 10.0, 250.0, 500.0, 999.0])
FLOW_T = torch.tensor([0.02, 0.25, 0.5, 0.75, 0.98])


def weighting(name, **options):
    return build_component("loss_weighting", name, options)


def edm_reference(ve: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Karras et al. 2022, eq. (8) with Table 1: lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
    return (ve**2 + sigma_data**2) / (ve * sigma_data) ** 2


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_matches_the_reference_formula_in_each_target_unit(sigma_data):
    w = weighting("edm", sigma_data=sigma_data)
    ddpm = DDPMScheduler()
    alpha, sigma = (v.double() for v in ddpm.alpha_sigma(DDPM_T))
    ve = sigma / alpha
    lam = edm_reference(ve, sigma_data)
    # the weight on the x0 error is lambda; an eps error is ve times an x0 error, a v error sigma times
    torch.testing.assert_close(w.weight(DDPM_T, ddpm, "x0").double(), lam.float().double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(w.weight(DDPM_T, ddpm, "eps").double(), (lam * ve**2).float().double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(w.weight(DDPM_T, ddpm, "v").double(), (lam * sigma**2).float().double(), rtol=1e-5, atol=0)
    flow = FlowScheduler()
    s = FLOW_T.double()
    lam = edm_reference(s / (1 - s), sigma_data)
    torch.testing.assert_close(w.weight(FLOW_T, flow, "flow").double(), (lam * s**2).float().double(), rtol=1e-5, atol=0)


def test_edm_is_finite_at_pure_noise():
    ddpm = DDPMScheduler(DDPMConfig(rescale_zero_terminal_snr=True))
    t = torch.tensor([999.0])
    for prediction_type in ("eps", "v"):
        assert torch.isfinite(weighting("edm").weight(t, ddpm, prediction_type)).all()


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_min_snr_is_the_schedulers_own_min_snr(prediction_type):
    own = DDPMScheduler(DDPMConfig(min_snr_gamma=5.0))
    got = weighting("min_snr", gamma=5).weight(DDPM_T, DDPMScheduler(), prediction_type)
    torch.testing.assert_close(got, own.loss_weight(DDPM_T, prediction_type))
    assert not torch.allclose(got, torch.ones_like(got))


def test_min_snr_on_a_flow_target_weighs_the_x0_error_by_min_snr():
    flow = FlowScheduler()
    s = FLOW_T.double()
    snr = ((1 - s) / s) ** 2
    expected = torch.clamp(snr, max=5.0) * s**2  # an x0 error is s times a flow-target error
    torch.testing.assert_close(weighting("min_snr", gamma=5).weight(FLOW_T, flow, "flow"), expected.float())


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_flow_weightings_match_the_flow_schedulers_and_carry_over_to_ddpm(scheme):
    own = FlowScheduler(FlowConfig(weighting=scheme))
    got = weighting(scheme).weight(FLOW_T, FlowScheduler(), "flow")
    torch.testing.assert_close(got, own.loss_weight(FLOW_T, "flow"))
    # on a DDPM path: the flow time with the same SNR, s = sigma / (alpha + sigma)
    ddpm = DDPMScheduler()
    alpha, sigma = ddpm.alpha_sigma(DDPM_T[1:])
    s = (sigma.double() / (alpha.double() + sigma.double())).float()
    expected = FlowScheduler(FlowConfig(weighting=scheme)).loss_weight(s, "eps")
    torch.testing.assert_close(weighting(scheme).weight(DDPM_T[1:], ddpm, "eps"), expected, rtol=1e-5, atol=0)
    if scheme == "cosmap":
        assert weighting(scheme).weight(torch.tensor([0.5]), FlowScheduler(), "flow").item() == pytest.approx(4 / math.pi)


def test_none_weighs_every_sample_one():
    got = weighting("none").weight(DDPM_T, DDPMScheduler(), "eps")
    assert got.dtype == torch.float32 and torch.equal(got, torch.ones(5))


# -- the job section ---------------------------------------------------------------------------------
JOB = {"model": {"type": "example-tiny"}, "data": {"type": "synthetic", "resolution": 8}}


def test_train_loss_weighting_section_is_structured_and_built():
    job = structure_job({**JOB, "train": {"steps": 3, "loss_weighting": {"type": "min_snr", "gamma": 3}}})
    assert job.loss_weighting.type == "min_snr" and job.loss_weighting.config.gamma == 3.0
    assert job.train.steps == 3
    assert job.to_dict()["train"]["loss_weighting"] == {"type": "min_snr", "gamma": 3.0}
    assert structure_job(job.to_dict()).loss_weighting == job.loss_weighting
    built = build_loss_weighting(job.loss_weighting)
    torch.testing.assert_close(
        built.weight(DDPM_T, DDPMScheduler(), "eps"), weighting("min_snr", gamma=3).weight(DDPM_T, DDPMScheduler(), "eps")
    )
    plain = structure_job(JOB)
    assert plain.loss_weighting is None and build_loss_weighting(None) is None
    assert "loss_weighting" not in plain.to_dict()["train"]
    assert structure_job({**JOB, "train": {"loss_weighting": "edm"}}).loss_weighting.config.sigma_data == 0.5


def test_train_loss_weighting_problems_name_their_path():
    with pytest.raises(ConfigError) as err:
        structure_job({**JOB, "train": {"loss_weighting": {"type": "min_snrr"}}})
    (problem,) = err.value.problems
    assert problem.path == "$.train.loss_weighting.type"
    assert problem.message.startswith("unknown loss weighting 'min_snrr'; did you mean 'min_snr'?; installed: ")
    with pytest.raises(ConfigError) as err:
        structure_job({**JOB, "train": {"loss_weighting": {"type": "edm", "sigma_data": 0, "gama": 1}}})
    paths = sorted(p.path for p in err.value.problems)
    assert paths == ["$.train.loss_weighting.gama", "$.train.loss_weighting.sigma_data"]
