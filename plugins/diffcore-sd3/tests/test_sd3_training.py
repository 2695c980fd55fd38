"""End to end (slow): a tiny SD3.5 medium trains a LoRA (transformer and CLIP-L) from a captioned
folder, resumes exactly, and samples with skip-layer guidance in the sample callback and through
``diffcore sample``, which give the same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _sd3_tiny import write_pipeline
from PIL import Image, ImageDraw

from diffcore.testing import run_cli, run_job

pytest.importorskip("diffcore_vae")
pytest.importorskip("diffcore_lora")
pytest.importorskip("deepspeed")

SIZE = 32
PROMPT = "a red cat"
SAMPLING = {"steps": 3, "guidance": 4.0, "seed": 5}
SLG = {"skip_layers": [1], "skip_layer_start": 0.0, "skip_layer_stop": 1.0}


def _folder(root):
    root.mkdir()
    for i, (caption, colour) in enumerate([("a red cat", "red"), ("a blue dog", "blue")] * 2):
        img = Image.new("RGB", (SIZE, SIZE), "white")
        ImageDraw.Draw(img).rectangle([4 + i, 6, 20 + i, 26], fill=colour)
        img.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


def _job(tmp_path, data, steps: int) -> dict:
    return {
        "name": "sd35-tiny",
        "seed": 3,
        "model": {"type": "sd35", "variant": "medium", "pretrained": str(tmp_path / "sd35"), "max_sequence_length": 8},
        "adapter": {"type": "lora", "rank": 2, "alpha": 2.0, "text_encoders": ["te1"]},
        "data": {"type": "folder", "path": str(data), "resolution": SIZE, "buckets": False, "bucket_step": 16},
        "train": {"steps": steps, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 1, "gradient_checkpointing": True},
        "callbacks": [{"type": "progress", "enabled": False},
                      {"type": "sample", "every": 0, "at_end": True, "prompts": [PROMPT], **SAMPLING,
                       "sampler": "euler", "sampler_options": SLG}],
    }  # fmt: skip


@pytest.mark.slow
def test_trains_resumes_and_samples_alike(tmp_path):
    write_pipeline(tmp_path / "sd35", "sd35-medium", vae=True)
    data = _folder(tmp_path / "data")
    straight = run_job(_job(tmp_path, data, steps=2), tmp_path / "straight")
    assert [row["step"] for row in straight.metrics] == [1, 2]
    assert all(np.isfinite(loss) for loss in straight.losses)
    split = tmp_path / "split"
    run_job(_job(tmp_path, data, steps=1), split)
    resumed = run_job(_job(tmp_path, data, steps=2), split, resume=True)
    assert resumed.losses == straight.losses
    a, b = straight.weights("adapter"), resumed.weights("adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn2_qkv") for k in a)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0") for k in a)

    callback_png = next((straight.output_dir / "samples" / "step-2").glob("sample-000*.png"))
    assert callback_png.is_file()
    out = tmp_path / "cli"
    options = [f"--sampler-option={k}={v}" for k, v in SLG.items()]
    done = run_cli(
        "sample", "--from", str(straight.output_dir), "--prompt", PROMPT, "--steps", str(SAMPLING["steps"]),
        "--guidance", str(SAMPLING["guidance"]), "--seed", str(SAMPLING["seed"]), "--device", "cpu",
        "--out", str(out), *options,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cli = np.asarray(Image.open(next(out.glob("sample-000*.png"))), dtype=np.int16)
    callback = np.asarray(Image.open(callback_png), dtype=np.int16)
    assert cli.shape == (SIZE, SIZE, 3)
    assert np.abs(cli - callback).max() <= 1  # the same image (a rounding step apart at most)

    plain = run_cli(
        "sample", "--from", str(straight.output_dir), "--prompt", PROMPT, "--steps", str(SAMPLING["steps"]),
        "--guidance", str(SAMPLING["guidance"]), "--seed", str(SAMPLING["seed"]), "--device", "cpu",
        "--out", str(tmp_path / "plain"),
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    without = np.asarray(Image.open(next((tmp_path / "plain").glob("sample-000*.png"))), dtype=np.int16)
    assert np.abs(without - cli).max() > 0  # skip-layer guidance changed the image


@pytest.mark.slow
def test_full_finetune_exports_what_diffusers_loads(tmp_path):
    """model.safetensors from a full finetune is an SD3Transformer2DModel state dict, key for key."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    import diffcore

    write_pipeline(tmp_path / "sd35", "sd35-large", vae=True)
    data = _folder(tmp_path / "data")
    job = _job(tmp_path, data, steps=1)
    job["model"] |= {"variant": "large"}
    del job["adapter"]
    job["callbacks"] = [{"type": "progress", "enabled": False}]
    job["train"] |= {"lr": 1e-3}
    run = run_job(job, tmp_path / "ft")
    assert len(run.losses) == 1 and np.isfinite(run.losses[0])
    trained = load_file(str(run.output_dir / "final" / "model.safetensors"))
    reference = SD3Transformer2DModel.from_pretrained(tmp_path / "sd35" / "transformer")
    before = reference.state_dict()
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in before)  # the step changed the weights
    reference.load_state_dict(trained, strict=True)
    model = diffcore.load_model("sd35", pretrained=tmp_path / "sd35", load_encoders=False)
    model.load_exported(trained)
    x = torch.randn(1, 16, 4, 4)
    cond = {"context": torch.randn(1, 5, 136), "pooled": torch.randn(1, 128)}
    with torch.no_grad():
        ours = model.predict(x, torch.tensor([0.4]), cond)
        theirs = reference(
            hidden_states=x, timestep=torch.tensor([400.0]), encoder_hidden_states=cond["context"],
            pooled_projections=cond["pooled"],
        ).sample  # fmt: skip
    assert (ours - theirs).abs().max() < 1e-4
