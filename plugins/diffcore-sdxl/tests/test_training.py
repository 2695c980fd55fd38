"""End to end: a tiny SDXL-shaped model trains a few steps from a captioned folder through the kernel
loop, then samples with DDIM, Euler and DPM-Solver++; the saved weights load back in both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sdxl_tiny import make_sdxl_pipeline

pytest.importorskip("diffcore_vae")
pytest.importorskip("deepspeed")
diffusers = pytest.importorskip("diffusers")


def _captioned_folder(root: Path) -> Path:
    from PIL import Image, ImageDraw

    root.mkdir()
    for i, (caption, colour) in enumerate([("a red cat", "red"), ("a blue dog", "blue")] * 2):
        img = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(img).ellipse([4 + i, 6, 24 + i, 26], fill=colour)
        img.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


@pytest.mark.slow
def test_train_then_sample(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    import diffcore
    from diffcore.config.job import structure_job
    from diffcore.sampling import generate
    from diffcore.training import run_job

    pipe = tmp_path / "sdxl"
    make_sdxl_pipeline(pipe)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        scaling_factor=0.13025,  # SDXL's, which a single file implies
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )
    vae.save_pretrained(pipe / "vae")
    model_section = {"type": "sdxl", "pretrained": str(pipe), "resolution": 32}
    job = {
        "name": "sdxl-tiny",
        "seed": 1,
        "output_dir": str(tmp_path / "run"),
        "model": model_section,
        "method": {"type": "diffusion"},
        "data": {
            "type": "folder",
            "path": str(_captioned_folder(tmp_path / "data")),
            "resolution": 32,
            "buckets": False,
            "bucket_step": 16,
        },
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "gradient_checkpointing": True},
        "callbacks": [{"type": "progress", "enabled": False}],
    }
    result = run_job(structure_job(job))
    assert result.steps == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    trained = load_file(str(next((tmp_path / "run" / "final").glob("*.safetensors"))))
    model = diffcore.load_model(**model_section)
    before = model.export_state_dict("diffusers")
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    model.backbone.load_state_dict(trained)

    scheduler = diffcore.load_scheduler(**model.default_scheduler)
    for sampler in ("ddim", "euler", "dpmpp_2m"):
        pixels = generate(
            model,
            scheduler,
            batch={"captions": ["a red cat"]},
            height=32,
            width=32,
            steps=3,
            sampler=sampler,
            guidance=5.0,
        )
        assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(pixels).all()

    # the trained model saved as one original file (UNet, both text encoders, VAE) loads back
    file = model.save_pretrained(tmp_path / "trained.safetensors", layout="original")
    again = diffcore.load_model(
        "sdxl",
        pretrained=str(file),
        tokenizer=str(pipe / "tokenizer"),
        tokenizer_2=str(pipe / "tokenizer_2"),
        resolution=32,
        vae_options={"norm_num_groups": 4},  # the one VAE fact a single file's shapes do not tell
    )
    a = generate(model, scheduler, batch={"captions": ["a blue dog"]}, height=32, width=32, steps=2, seed=4)
    b = generate(again, scheduler, batch={"captions": ["a blue dog"]}, height=32, width=32, steps=2, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
