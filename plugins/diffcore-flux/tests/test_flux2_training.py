"""End to end (slow): a tiny klein trains a LoRA on a metadata file with a reference list (Kontext) or a
reference and a mask (Fill), resumes exactly, samples during training and through
``diffcore sample --reference`` (and ``--mask``), and refuses a mask that does not match its image."""

from __future__ import annotations

import json

import pytest
import torch
from _flux2_tiny import model_options, write_pipeline
from PIL import Image, ImageDraw

from diffcore.testing import run_cli, run_job

pytest.importorskip("diffcore_vae")
pytest.importorskip("diffcore_lora")
pytest.importorskip("deepspeed")

SIZE = 32


def _dataset(root, fill: bool):
    root.mkdir()
    rows = []
    for i, (caption, colour) in enumerate([("a red cat", "red"), ("a blue dog", "blue")] * 2):
        img = Image.new("RGB", (SIZE, SIZE), "white")
        ImageDraw.Draw(img).rectangle([4 + i, 6, 20 + i, 26], fill=colour)
        img.save(root / f"{i}.png")
        Image.new("RGB", (SIZE, SIZE), colour).save(root / f"ref{i}.png")
        row = {"image": f"{i}.png", "caption": caption}
        if fill:
            mask = Image.new("L", (SIZE, SIZE), 0)
            ImageDraw.Draw(mask).rectangle([8, 8, 23, 23], fill=255)
            mask.save(root / f"mask{i}.png")
            row |= {"reference": f"ref{i}.png", "mask": f"mask{i}.png"}
        else:
            Image.new("RGB", (SIZE, SIZE), "green").save(root / f"style{i}.png")
            row["reference"] = [f"ref{i}.png", f"style{i}.png"]
        rows.append(row)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _job(tmp_path, data, fill: bool, steps: int) -> dict:
    edit = {"references": [str(data / "ref0.png")]}
    edit |= {"mask": str(data / "mask0.png")} if fill else {"references": [str(data / "ref0.png"), str(data / "style0.png")]}
    return {
        "name": "flux2-tiny",
        "seed": 3,
        "model": {"type": "flux2", "pretrained": str(tmp_path / "klein"), **model_options(False, vae_options={"latent_channels": 4})},
        "adapter": {"type": "lora", "rank": 2, "alpha": 2.0},
        "data": {"type": "metadata", "file": str(data / "metadata.jsonl"), "resolution": SIZE, "buckets": False,
                 "bucket_step": 16},
        "train": {"steps": steps, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 1, "gradient_checkpointing": True},
        "callbacks": [{"type": "progress", "enabled": False},
                      {"type": "sample", "every": 0, "at_end": True, "prompts": ["a red cat"], "steps": 2, **edit}],
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fill", [False, True], ids=["kontext", "fill"])
def test_trains_resumes_and_samples_with_references(tmp_path, fill):
    write_pipeline(tmp_path / "klein", dev=False, vae=True)
    data = _dataset(tmp_path / "data", fill)
    straight = run_job(_job(tmp_path, data, fill, steps=2), tmp_path / "straight")
    assert [row["step"] for row in straight.metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in straight.losses)
    split = tmp_path / "split"
    run_job(_job(tmp_path, data, fill, steps=1), split)
    resumed = run_job(_job(tmp_path, data, fill, steps=2), split, resume=True)
    assert resumed.losses == straight.losses
    a, b = straight.weights("adapter"), resumed.weights("adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in a)
    assert len(list((straight.output_dir / "samples").rglob("*.png"))) >= 1  # the sample callback ran

    out = tmp_path / "cli"
    edit = ["--reference", str(data / "ref1.png")]
    edit += ["--mask", str(data / "mask1.png")] if fill else ["--reference", str(data / "style1.png")]
    common = ["sample", "--from", str(straight.output_dir), "--prompt", "a blue dog", "--steps", "2", "--device", "cpu"]
    done = run_cli(*common, *edit, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    pngs = [p for p in out.glob("*.png") if p.name != "grid.png"]
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (SIZE, SIZE)
    if fill:  # a mask of another size than the image it edits exits 2, naming both sizes
        Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
        bad = run_cli(*common, "--reference", str(data / "ref1.png"), "--mask", str(tmp_path / "small.png"))
        assert bad.returncode == 2
        assert "the mask is 16x16 pixels but the image it edits (the first reference) is 32x32" in bad.stderr
