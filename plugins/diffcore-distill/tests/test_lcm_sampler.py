"""The kernel's ``lcm`` sampler against diffusers' LCMScheduler: the same timesteps, boundary
condition and re-noising draws, first on a stand-in eps model, then with an LCM-LoRA trained by the
``lcm`` method on a tiny SD1.5 pipeline, saved, loaded into diffusers and sampled at 4 steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcore.diffusion.scheduler import DDPMScheduler
from diffcore.diffusion.schedules import lcm_timesteps
from diffcore.sampling import build_sampler
from diffcore.testing import run_job

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_timesteps_are_diffusers(steps: int) -> None:
    ref = diffusers.LCMScheduler()
    ref.set_timesteps(steps)
    assert lcm_timesteps(1000, steps).long().tolist() == ref.timesteps.tolist()


def fake_eps(x: torch.Tensor, t: float) -> torch.Tensor:
    # depends on x and t nonlinearly, so every coefficient of the step shows in the result
    return torch.tanh(x * 0.7 + t / 500.0) - 0.1 * x


@pytest.mark.parametrize("steps", [1, 4])
def test_sampler_matches_lcm_scheduler(steps: int) -> None:
    from diffcore.diffusion.objectives import to_x0_eps

    shape = (2, 4, 8, 8)
    ref = diffusers.LCMScheduler()
    ref.set_timesteps(steps)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    for t in ref.timesteps:
        x = ref.step(fake_eps(x, float(t)), t, x, generator=gen).prev_sample

    schedule = DDPMScheduler().sampling_schedule(steps, "lcm")
    assert schedule.timesteps.tolist() == ref.timesteps.tolist()

    def denoise(x: torch.Tensor, i: int):
        out = fake_eps(x, float(schedule.timesteps[i]))
        return to_x0_eps(out, x, float(schedule.alphas[i]), float(schedule.sigmas[i]), "eps")

    gen = torch.Generator().manual_seed(3)
    start = torch.randn(shape, generator=gen)
    ours = build_sampler("lcm")(denoise, start, schedule, generator=gen)
    # float32 both, diffusers' alphas in float32 and ours in float64: agreement to float32 rounding
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_lcm_sampler_on_flow_renoises_along_the_path() -> None:
    """On rectified flow a step jumps to x0 and re-noises to the next sigma with fresh noise."""
    from diffcore.diffusion.scheduler import FlowScheduler

    schedule = FlowScheduler().sampling_schedule(2, "lcm")
    x0 = torch.full((1, 1, 2, 2), 0.25)
    seen = []

    def denoise(x: torch.Tensor, i: int):
        seen.append(x.clone())
        s = float(schedule.sigmas[i])
        return x0, (x - (1 - s) * x0) / s

    gen = torch.Generator().manual_seed(0)
    start = torch.randn((1, 1, 2, 2), generator=gen)
    out = build_sampler("lcm")(denoise, start, schedule, generator=gen)
    fresh = torch.randn((1, 1, 2, 2), generator=_after_one_draw())
    s1 = float(schedule.sigmas[1])
    torch.testing.assert_close(seen[1], (1 - s1) * x0 + s1 * fresh)
    torch.testing.assert_close(out, x0)


def _after_one_draw() -> torch.Generator:
    g = torch.Generator().manual_seed(0)
    torch.randn((1, 1, 2, 2), generator=g)
    return g


@pytest.mark.slow
def test_lcm_lora_loads_in_diffusers_and_samples_alike(tmp_path: Path) -> None:
    pytest.importorskip("diffcore_sdxl")
    pytest.importorskip("diffcore_lora")
    pytest.importorskip("diffcore_vae")
    from diffcore_distill import plugin
    from diffcore_lora import plugin as lora_plugin
    from diffcore_sdxl import plugin as sdxl_plugin
    from diffcore_vae import plugin as vae_plugin

    import diffcore
    from diffcore.sampling import generate
    from diffcore.testing import plugins_registered
    from diffcore.testing.tiny_sd import write_pipeline

    parts = write_pipeline(tmp_path / "sd15", "sd15", with_vae=True)
    job = {
        "name": "lcm-lora",
        "model": {"type": "sd15", "pretrained": str(tmp_path / "sd15"), "resolution": 16},
        # the PEFT/diffusers layout, as the published LCM-LoRAs ship (diffusers' kohya converter assumes
        # SD1.5's real block layout, which this tiny UNet does not have)
        "adapter": {"type": "lora", "rank": 4, "save_format": "peft"},
        "method": {"type": "lcm", "guidance": [2.0, 4.0]},
        "data": {"type": "synthetic", "resolution": 16, "size": 8},
        "train": {"steps": 2, "batch_size": 2, "lr": 5e-2},
    }
    plugins = [plugin, sdxl_plugin, vae_plugin, lora_plugin]
    run = run_job(job, tmp_path / "out", plugins=plugins)
    lora_file = run.output_dir / "final" / "adapter.safetensors"
    assert all(row["loss"] > 0 for row in run.metrics)

    prompt = ["a red circle", "a blue triangle"]
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=diffusers.LCMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(prompt, height=16, width=16, num_inference_steps=4, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(5), output_type="latent").images  # fmt: skip
    pipe.load_lora_weights(str(lora_file))
    ref = pipe(prompt, height=16, width=16, num_inference_steps=4, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(5), output_type="latent").images  # fmt: skip
    assert (ref - plain).abs().max() > 1e-3  # the adapter loaded and changes the samples

    with plugins_registered(*plugins):
        model = diffcore.load_model("sd15", pretrained=str(tmp_path / "sd15"), resolution=16)
        options = {k: v for k, v in model.default_scheduler.items() if k != "type"}
        scheduler = diffcore.build_component("scheduler", model.default_scheduler["type"], options)
        adapter = diffcore.build_component("adapter", "lora", {})
        adapter.from_file(model, lora_file, 1.0)
        ours = generate(model, scheduler, batch={"captions": prompt}, height=16, width=16, steps=4, sampler="lcm",
                        guidance=1.0, seed=5, return_latents=True)  # fmt: skip
    assert (ours - ref).abs().max() < 1e-4
