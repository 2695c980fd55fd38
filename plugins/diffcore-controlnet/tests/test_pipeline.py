"""A saved ControlNet in diffusers' own pipeline reproduces diffcore's prediction; the SD1.x single file
reads back with diffusers' converter for lllyasviel's original layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import SD15_UNET, randomize, unet_folder
from diffcore_controlnet import layouts
from diffcore_controlnet.config import ControlNetConfig
from diffcore_controlnet.method import ControlNetMethod

import diffcore
from diffcore.testing import assert_outputs_close

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory):
    """A tiny SD1.5 pipeline folder, the diffcore model loaded from it and a trained-looking ControlNet
    (every weight random) saved in both published layouts."""
    root = tmp_path_factory.mktemp("sd15")
    parts = unet_folder(root / "pipe", SD15_UNET, seed=1, text=True)
    model = diffcore.load_model("sd15", pretrained=str(root / "pipe"), autoencoder=False)
    method = ControlNetMethod(ControlNetConfig())  # diffusers' embedding widths: control at 8x the latents
    net = randomize(method.modules(model)["controlnet"], seed=2, std=0.05)
    state = net.state_dict()
    folder = layouts.save_folder(net, state, root / "controlnet", {})
    single = layouts.save_original(net, state, model, root / "controlnet.safetensors", {})
    return model, method, parts, folder, single


def test_a_diffusers_controlnet_pipeline_reproduces_the_prediction(sd15) -> None:
    model, method, parts, folder, _ = sd15
    controlnet = diffusers.ControlNetModel.from_pretrained(str(folder)).eval()
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=None,
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        controlnet=controlnet,
        scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs, output):  # what the pipeline's UNet got and gave
        seen.append((args[0].clone(), torch.as_tensor(args[1]).clone(), output[0].clone()))

    hook = parts["unet"].register_forward_hook(record, with_kwargs=True)
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # [0, 1]
    try:
        with torch.no_grad():
            pipe(
                "a cat",
                image=control,
                height=64,
                width=64,
                num_inference_steps=2,
                guidance_scale=1.0,
                controlnet_conditioning_scale=0.6,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            )
    finally:
        hook.remove()
    assert len(seen) == 2

    method.config.conditioning_scale = 0.6
    try:
        with torch.no_grad():
            cond = model.encode_conditions({"captions": ["a cat"]})
            for latents, t, want in seen:
                got = method.predict(model, latents, t.reshape(1).float(), cond, {"control": control * 2 - 1})
                assert_outputs_close(got, want, atol=1e-4, what=f"prediction at t={int(t)}")
                alone = model.predict(latents, t.reshape(1).float(), cond)
                assert (alone - want).abs().max() > 1e-3  # the ControlNet's part was compared too
    finally:
        method.config.conditioning_scale = 1.0


def test_the_sd15_single_file_reads_back_with_diffusers_converter(sd15) -> None:
    from safetensors.torch import load_file

    _, _, _, folder, single = sd15
    assert all(k.startswith("control_model.") for k in load_file(str(single)))
    from_file = diffusers.ControlNetModel.from_single_file(str(single), config=str(folder), local_files_only=True)
    from_folder = diffusers.ControlNetModel.from_pretrained(str(folder))
    a, b = from_file.state_dict(), from_folder.state_dict()
    assert set(a) == set(b)
    for key in b:
        assert torch.equal(a[key], b[key]), key


def _vae(folder: Path) -> None:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],  # 8x down, as the ControlNet's default embedding expects
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )
    randomize(vae, seed=0, std=0.2).save_pretrained(folder / "vae")  # so the pixels follow the latents


def test_diffcore_sample_with_controlnet_and_control(sd15, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    import numpy as np
    from PIL import Image

    from diffcore.cli import main

    pytest.importorskip("diffcore_vae")
    _, _, parts, folder, _ = sd15
    pipe = tmp_path / "pipe"
    shutil.copytree(folder.parent / "pipe", pipe)
    _vae(pipe)
    control = tmp_path / "edges.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(control)

    def sample(name: str, *extra: str) -> np.ndarray:
        args = ["sample", "--model", "sd15", "--pretrained", str(pipe), "--prompt", "a cat", "--steps", "2"]
        args += ["--height", "64", "--guidance", "1", "--out", str(tmp_path / name), "--no-grid", *extra]
        assert main(args) == 0
        return np.asarray(Image.open(next((tmp_path / name).glob("*.png"))), dtype=np.float32)

    plain = sample("plain")
    # the tiny random UNet passes little of the residuals on: a large scale makes them show
    steered = sample("steered", "--controlnet", str(folder), "--control", str(control), "--controlnet-scale", "100")
    muted = sample("muted", "--controlnet", str(folder), "--control", str(control), "--controlnet-scale", "0")
    assert np.abs(steered - plain).max() > 1  # the ControlNet changed the image
    assert np.array_equal(muted, plain)  # and at scale 0 it adds nothing

    capsys.readouterr()
    missing = ["sample", "--model", "sd15", "--pretrained", str(pipe), "--prompt", "x"]
    assert main([*missing, "--controlnet", str(tmp_path / "nope"), "--control", str(control)]) == 2
    assert "--controlnet" in capsys.readouterr().err
    assert main([*missing, "--controlnet", str(folder)]) == 2  # no control image
    assert "control" in capsys.readouterr().err


def test_a_diffusers_flux_controlnet_pipeline_reproduces_the_prediction(tmp_path: Path) -> None:
    from _tiny import flux_pipeline
    from diffcore_flux.packing import unpack
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    root = tmp_path / "flux"
    flux_pipeline(root)
    model = diffcore.load_model("flux", pretrained=str(root), axes_dim=[4, 6, 6], max_sequence_length=8)
    method = ControlNetMethod(ControlNetConfig(num_layers=1, num_single_layers=1))
    net = randomize(method.modules(model)["controlnet"], seed=2)
    folder = layouts.save_folder(net, net.state_dict(), tmp_path / "controlnet", {})

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 8],
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        shift_factor=0.1159,  # Flux's
        scaling_factor=0.3611,
    )
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(str(root / "transformer"))
    pipe = diffusers.FluxControlNetPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(str(root / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
        text_encoder_2=T5EncoderModel.from_pretrained(str(root / "text_encoder_2")),
        tokenizer_2=T5TokenizerFast.from_pretrained(str(root / "tokenizer_2")),
        transformer=transformer,
        controlnet=diffusers.FluxControlNetModel.from_pretrained(str(folder)),
    )
    controls: list[torch.Tensor] = []
    seen: list[tuple[dict, torch.Tensor]] = []
    hooks = [
        pipe.controlnet.register_forward_pre_hook(
            lambda m, args, kwargs: controls.append(kwargs["controlnet_cond"].clone()), with_kwargs=True
        ),
        transformer.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((dict(kwargs), out[0].clone())), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            pipe(
                "a square",
                control_image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
                height=32,
                width=32,
                num_inference_steps=2,
                guidance_scale=3.5,
                controlnet_conditioning_scale=0.7,
                max_sequence_length=8,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            )
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(controls) == 2

    with torch.no_grad():
        cond = model.encode_conditions({"captions": ["a square"]})
        for control, (kwargs, want) in zip(controls, seen):
            latents = unpack(kwargs["hidden_states"], 16, 16)
            t, g = kwargs["timestep"], kwargs["guidance"]
            # the pipeline's control latents (it draws them from the VAE's posterior; diffcore's own
            # preparation is the autoencoder's encode, tested with diffcore-vae)
            residuals = net(latents, t, cond, unpack(control, 16, 16), 0.7, guidance=g)
            got = model.predict(latents, t, cond, guidance=g, **residuals)
            assert_outputs_close(got, unpack(want, 16, 16), atol=1e-4, what=f"prediction at sigma={float(t[0]):.3f}")
            assert (got - model.predict(latents, t, cond, guidance=g)).abs().max() > 1e-3
