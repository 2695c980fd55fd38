"""End to end: a tiny Flux-shaped model trains a few steps through the kernel loop (plain and Kontext)
and samples, with and without a reference image."""

from __future__ import annotations

import json

import pytest
import torch
from _flux_tiny import AXES, LATENT_CHANNELS, write_pipeline

pytest.importorskip("diffcore_vae")
pytest.importorskip("deepspeed")

VAE = dict(block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=LATENT_CHANNELS)


def _dataset(root, with_reference: bool):
    from PIL import Image, ImageDraw

    root.mkdir()
    rows = []
    for i, (caption, colour) in enumerate([("a red cat", "red"), ("a blue dog", "blue")] * 2):
        img = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(img).rectangle([4 + i, 6, 20 + i, 26], fill=colour)
        img.save(root / f"{i}.png")
        row = {"image": f"{i}.png", "caption": caption}
        if with_reference:
            Image.new("RGB", (32, 32), colour).save(root / f"ref{i}.png")
            row["reference"] = f"ref{i}.png"
        rows.append(row)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "metadata.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("kontext", [False, True], ids=["plain", "kontext"])
def test_train_and_sample(tmp_path, kontext):
    from safetensors.torch import load_file

    import diffcore
    from diffcore.config.job import structure_job
    from diffcore.sampling import generate
    from diffcore.training import run_job

    write_pipeline(tmp_path / "flux", guidance=True)
    model_section = {
        "type": "flux",
        "pretrained": str(tmp_path / "flux"),
        "axes_dim": AXES,
        "max_sequence_length": 8,
        "kontext": kontext,
        "vae_options": VAE,
    }
    job = {
        "name": "flux-tiny",
        "seed": 3,
        "output_dir": str(tmp_path / "run"),
        "model": model_section,
        "method": {"type": "diffusion"},
        "data": {
            "type": "metadata",
            "file": str(_dataset(tmp_path / "data", kontext)),
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
    assert any(not torch.equal(trained[k], before[k]) for k in before)  # the steps changed the weights

    scheduler = diffcore.load_scheduler(**model.default_scheduler)
    batch = {"captions": ["a red cat"]}
    if kontext:
        batch["reference"] = torch.ones(1, 3, 32, 32)
    pixels = generate(model, scheduler, batch=batch, height=32, width=32, steps=2, guidance=3.5, seed=0)
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(pixels).all()
    if kontext:  # the reference image changes what is sampled
        other = generate(
            model,
            scheduler,
            batch={**batch, "reference": -batch["reference"]},
            height=32,
            width=32,
            steps=2,
            seed=0,
        )
        assert (other - pixels).abs().max() > 1e-4
