"""End to end through the kernel loop: a tiny pixel-space SD1.5-shaped UNet, frozen, steered by a
ControlNet trained on a metadata dataset's control column; ZeRO-2/3, the exports, the errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import SD15_UNET, unet_folder
from diffcore_controlnet.config import ControlNetConfig
from diffcore_controlnet.method import ControlNetMethod

import diffcore
from diffcore.errors import UserError
from diffcore.testing import run_job

pytest.importorskip("deepspeed")
diffusers = pytest.importorskip("diffusers")

SIZE = 16
#: the square's top-left corner per example: four places, told apart only by the control image
CORNERS = [(1, 1), (1, 9), (9, 1), (9, 9)]


def _images(root: Path, count: int, with_control: bool = True) -> Path:
    """``count`` black images with a white 6x6 square at one of four places, all captioned alike, and
    (``with_control``) the square's outline as the control image."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        top, left = CORNERS[i % len(CORNERS)]
        image = Image.new("RGB", (SIZE, SIZE), "black")
        ImageDraw.Draw(image).rectangle([left, top, left + 5, top + 5], fill="white")
        image.save(root / f"{i}.png")
        row: dict[str, Any] = {"image": f"{i}.png", "caption": "a square"}
        if with_control:
            control = Image.new("RGB", (SIZE, SIZE), "black")
            ImageDraw.Draw(control).rectangle([left, top, left + 5, top + 5], outline="white")
            control.save(root / f"{i}-edge.png")
            row["control"] = f"{i}-edge.png"
        rows.append(row)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root / "metadata.jsonl"


@pytest.fixture(scope="module")
def pixel_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pixel-space SD1.5-shaped pipeline folder (3-channel UNet, tiny CLIP and tokenizer)."""
    root = tmp_path_factory.mktemp("sd15") / "pipe"
    unet_folder(root, {**SD15_UNET, "in_channels": 3, "out_channels": 3}, seed=0, text=True, std=None)
    return root


def _job(pipe: Path, metadata: Path, **train: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "model": {"type": "sd15", "pretrained": str(pipe), "autoencoder": False, "resolution": SIZE},
        "method": {"type": "controlnet", "conditioning_embedding_out_channels": [8]},
        "data": {"type": "metadata", "file": str(metadata), "resolution": SIZE, "buckets": False, "bucket_step": 16},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, **train},
        "callbacks": [{"type": "progress", "enabled": False}],
    }


def _placement(model: Any, method: ControlNetMethod, control: torch.Tensor) -> torch.Tensor:
    """(controls, places) brightness of the predicted clean image in each of the four places, when
    the noisy input holds no square at all: whatever place stands out, the control put it there."""
    scheduler = diffcore.load_scheduler(**model.default_scheduler)
    g = torch.Generator().manual_seed(7)
    n = len(control)
    cond = model.encode_conditions({"captions": ["a square"] * n})
    blank = torch.full((n, 3, SIZE, SIZE), -1.0)
    x0 = torch.zeros_like(blank)
    with torch.no_grad():
        for level in (300.0, 500.0, 700.0) * 4:
            t = torch.full((n,), level)
            alpha, sigma = (v.view(-1, 1, 1, 1) for v in scheduler.alpha_sigma(t))
            noisy = scheduler.add_noise(blank, torch.randn(blank.shape, generator=g), t)
            eps = method.predict(model, noisy, t, cond, {"control": control})
            x0 += (noisy - sigma * eps) / alpha / 12
    return torch.stack([x0[:, :, top : top + 6, left : left + 6].mean((1, 2, 3)) for top, left in CORNERS], dim=1)


@pytest.mark.slow
def test_a_tiny_run_learns_where_the_control_puts_the_shape(pixel_sd15: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from diffcore.inputs import load_inputs

    metadata = _images(tmp_path / "data", 16)
    # first a base model that draws squares, anywhere (the captions never say where) ...
    pipe = tmp_path / "pipe"
    shutil.copytree(pixel_sd15, pipe)
    base = _job(pipe, metadata, steps=40, batch_size=8, lr=1e-3)
    base["method"] = {"type": "diffusion"}
    trained = load_file(str(run_job(base, tmp_path / "base").output_dir / "final" / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in trained.items()}, str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    # ... then a ControlNet beside it, frozen, that learns to place them where the control says
    run = run_job(_job(pipe, metadata, steps=60, batch_size=8, lr=3e-3), tmp_path / "run")
    assert len(run.losses) == 60

    model = diffcore.load_model("sd15", pretrained=str(pipe), autoencoder=False, resolution=SIZE)
    method = ControlNetMethod(ControlNetConfig(conditioning_embedding_out_channels=[8]))
    net = method.modules(model)["controlnet"]
    net.load_state_dict(load_file(str(run.output_dir / "final" / "controlnet.safetensors")))
    edges = metadata.parent
    control = torch.cat(
        [load_inputs({"c": edges / f"{i}-edge.png"}, count=1, height=SIZE, width=SIZE)["c"] for i in range(4)]
    )
    brightness = _placement(model, method, control)
    # control i outlines place i: the brightest place of every prediction is the one its control drew
    assert brightness.argmax(dim=1).tolist() == [0, 1, 2, 3], brightness
    # and by a margin over the other places (chance would put the control's place anywhere)
    others = (brightness.sum(1) - brightness.diagonal()) / 3
    assert bool((brightness.diagonal() > others + 0.1).all()), brightness


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "no")], ids=["zero2-bf16", "zero3"])
def test_trains_under_zero_and_exports_the_published_layouts(
    pixel_sd15: Path, tmp_path: Path, stage: int, precision: str
) -> None:
    from safetensors.torch import load_file

    metadata = _images(tmp_path / "data", 8)
    job = _job(pixel_sd15, metadata, deepspeed={"zero_stage": stage}, checkpoint_every=2, mixed_precision=precision)
    # the sample callback steers with a control image too (through the method's predict)
    sample = {"type": "sample", "prompts": ["a square"], "steps": 2, "guidance": 1.0}
    job["callbacks"].append({**sample, "inputs": {"control": str(metadata.parent / "0-edge.png")}})
    run = run_job(job, tmp_path / "run")
    assert list((run.output_dir / "samples").glob("step-2/*.png"))
    assert len(run.losses) == 2 and all(torch.isfinite(torch.tensor(run.losses)))

    final = run.output_dir / "final"
    ours = load_file(str(final / "controlnet.safetensors"))
    assert any(k.startswith("zero.") and v.abs().max() > 0 for k, v in ours.items())  # it trained
    reference = diffusers.ControlNetModel.from_pretrained(str(final / "controlnet"))
    published = load_file(str(final / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert set(published) == set(reference.state_dict())
    projections = len({k.split(".")[1] for k in ours if k.startswith("zero.")})
    torch.testing.assert_close(published["controlnet_mid_block.weight"], ours[f"zero.{projections - 1}.weight"])
    original = load_file(str(final / "controlnet-original.safetensors"))
    assert all(k.startswith("control_model.") for k in original)
    assert {"control_model.input_hint_block.0.weight", "control_model.middle_block_out.0.weight"} <= set(original)
    assert len(original) == len(published)
    # a checkpoint holds the same layouts
    assert (run.output_dir / "checkpoints" / "step-2" / "controlnet" / "config.json").is_file()
    # and diffcore sample takes the run with a control image
    from diffcore.cli import main

    args = ["sample", "--from", str(run.output_dir), "--prompt", "a square", "--steps", "2", "--height", "64"]
    assert main([*args, "--control", str(metadata.parent / "2-edge.png"), "--guidance", "1"]) == 0
    assert list((run.output_dir / "samples" / "cli").glob("*.png"))


def test_a_model_without_residual_inputs_is_a_user_error() -> None:
    from diffcore.testing import TinyModel

    with pytest.raises(UserError, match="takes no ControlNet residuals") as err:
        ControlNetMethod(ControlNetConfig()).modules(TinyModel())
    assert err.value.where == "$.model.type"


def _run_cli(job: dict[str, Any], output_dir: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``diffcore run`` in this process: (exit status, stderr)."""
    from diffcore.cli import main
    from diffcore.testing.jobs import write_job

    capsys.readouterr()
    status = main(["run", str(write_job(job, output_dir))])
    return status, capsys.readouterr().err


def test_a_controlnet_job_on_a_model_without_residual_inputs_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = {
        "model": {
            "type": "dit",
            "hidden_size": 32,
            "depth": 1,
            "num_heads": 2,
            "patch_size": 4,
            "input_size": 8,
            "in_channels": 3,
            "num_classes": 2,
        },
        "method": {"type": "controlnet"},
        "data": {"type": "synthetic", "resolution": 8, "size": 8},
        "train": {"steps": 1, "batch_size": 2},
    }
    status, err = _run_cli(job, tmp_path / "run", capsys)
    assert status == 2
    assert "takes no ControlNet residuals" in err and "$.model.type" in err


def test_missing_control_images_exit_2(pixel_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metadata = _images(tmp_path / "data", 4, with_control=False)
    status, err = _run_cli(_job(pixel_sd15, metadata, steps=1), tmp_path / "run", capsys)
    assert status == 2
    assert "no control image" in err and "$.data" in err


@pytest.mark.slow
def test_flux_controlnet_trains_samples_and_exports(tmp_path: Path) -> None:
    from _tiny import flux_pipeline

    pytest.importorskip("diffcore_vae")
    flux_pipeline(tmp_path / "flux")
    metadata = _images(tmp_path / "data", 4)
    vae = {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4}
    job = {
        "seed": 0,
        "model": {
            "type": "flux",
            "pretrained": str(tmp_path / "flux"),
            "axes_dim": [4, 6, 6],
            "max_sequence_length": 8,
            "vae_options": vae,
        },
        "method": {"type": "controlnet", "num_layers": 1, "num_single_layers": 1, "control_dropout": 0.5},
        "data": {"type": "metadata", "file": str(metadata), "resolution": SIZE * 2, "buckets": False, "bucket_step": 16, "allow_upscale": True},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "gradient_checkpointing": True},
        "callbacks": [
            {"type": "progress", "enabled": False},
            {"type": "sample", "prompts": ["a square"], "steps": 2, "inputs": {"control": str(metadata.parent / "1-edge.png")}},
        ],
    }
    run = run_job(job, tmp_path / "run")
    assert len(run.losses) == 2 and all(torch.isfinite(torch.tensor(run.losses)))
    assert list((run.output_dir / "samples").glob("step-2/*.png"))
    folder = run.output_dir / "final" / "controlnet"
    reference = diffusers.FluxControlNetModel.from_pretrained(str(folder))
    assert reference.config.num_layers == 1 and reference.config.guidance_embeds
    assert not (run.output_dir / "final" / "controlnet-original.safetensors").exists()  # diffusers keys only


@pytest.mark.slow
def test_trains_from_a_complete_latent_cache(tmp_path: Path) -> None:
    """The second run finds every latent and text feature cached, loads neither the autoencoder nor the
    text encoder, and the ControlNet still gets its control images (rendered beside the cache)."""
    pytest.importorskip("diffcore_vae")
    from _tiny import SD15_UNET, unet_folder

    pipe = tmp_path / "pipe"
    unet_folder(pipe, SD15_UNET, seed=0, text=True)
    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],  # 8x down, as the default control embedding
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    ).save_pretrained(pipe / "vae")
    metadata = _images(tmp_path / "data", 4)
    job = _job(pipe, metadata)
    job["model"] = {"type": "sd15", "pretrained": str(pipe), "resolution": 64, "vae_options": {"norm_num_groups": 4}}
    job["method"] = {"type": "controlnet"}
    job["data"].update(resolution=64, allow_upscale=True, cache_dir=str(tmp_path / "cache"))
    first = run_job(job, tmp_path / "first")
    second = run_job(job, tmp_path / "second")
    assert len(second.losses) == 2
    assert second.losses == first.losses  # the same batches, features and draws, from the cache
