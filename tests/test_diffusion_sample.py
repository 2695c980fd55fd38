"""generate() with Model-protocol objects, and the `diffcore sample` command end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import diffcore
from diffcore.cli import main
from diffcore.diffusion.config import FlowConfig
from diffcore.diffusion.scheduler import DDPMScheduler, FlowScheduler
from diffcore.model import DiffusionModel
from diffcore.sampling import generate, image_grid, save_png, to_pil
from diffcore.weights import save_safetensors

from .jobs import tiny_job


class LinearModel(DiffusionModel):
    """A model-contract toy: output = a x + b label + c t, recording what predict receives."""

    latent_channels = 3
    latent_downscale = 2

    def __init__(self, prediction_type="eps", guidance_embedded=False, seq_len=None):
        super().__init__(torch.nn.Conv2d(3, 3, 1))
        self.prediction_type = prediction_type
        self.guidance_embedded = guidance_embedded
        self.seen: list[dict] = []
        self.null_calls = 0
        self.seq_len = seq_len

    def sequence_length(self, latents):
        return super().sequence_length(latents) if self.seq_len is None else self.seq_len

    def encode_conditions(self, batch):
        return torch.as_tensor(batch["labels"]).float()

    def null_batch(self, batch):
        self.null_calls += 1
        return {"labels": torch.zeros_like(torch.as_tensor(batch["labels"]))}

    def decode_latents(self, latents):
        return torch.nn.functional.interpolate(latents, scale_factor=2.0)

    def predict(self, x, t, cond, **extra):
        self.seen.append({"t": t.clone(), "cond": cond.clone(), **extra})
        return 0.5 * x + 0.1 * cond[:, None, None, None] + 1e-4 * t[:, None, None, None]


def test_generate_is_reproducible_and_reports_each_step():
    model, sched = LinearModel(), DDPMScheduler()
    infos = []
    batch = {"labels": torch.tensor([1, 2])}
    a = generate(
        model,
        sched,
        batch=batch,
        height=8,
        width=12,
        steps=5,
        sampler="euler_a",
        seed=3,
        callback=infos.append,
    )
    b = generate(model, sched, batch=batch, height=8, width=12, steps=5, sampler="euler_a", seed=3)
    c = generate(model, sched, batch=batch, height=8, width=12, steps=5, sampler="euler_a", seed=4)
    assert a.shape == (2, 3, 8, 12) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert [i.step for i in infos] == list(range(5)) and infos[0].steps == 5
    assert infos[0].latents.shape == (2, 3, 4, 6) and infos[-1].t == float(
        sched.sampling_schedule(5).timesteps[-1]
    )
    assert model.backbone.training  # restored after sampling


def test_classifier_free_guidance_calls_both_branches():
    model = LinearModel()
    generate(
        model,
        DDPMScheduler(),
        batch={"labels": torch.tensor([1.0])},
        height=4,
        width=4,
        steps=3,
        guidance=5.0,
    )
    conds = [s["cond"].item() for s in model.seen]
    assert conds == [1.0, 0.0] * 3 and model.null_calls == 1
    model = LinearModel()
    generate(
        model,
        DDPMScheduler(),
        batch={"labels": torch.tensor([1.0])},
        height=4,
        width=4,
        steps=3,
        guidance=1.0,
    )
    assert len(model.seen) == 3 and model.null_calls == 0


def test_distilled_guidance_is_an_input_not_cfg():
    model = LinearModel("flow", guidance_embedded=True)
    generate(
        model,
        FlowScheduler(),
        batch={"labels": torch.tensor([1.0, 2.0])},
        height=4,
        width=4,
        steps=4,
        guidance=3.5,
    )
    assert len(model.seen) == 4 and model.null_calls == 0
    assert all(torch.equal(s["guidance"], torch.full((2,), 3.5)) for s in model.seen)
    model.seen.clear()
    generate(model, FlowScheduler(), batch={"labels": torch.tensor([1.0])}, height=4, width=4, steps=2)
    assert all("guidance" not in s for s in model.seen)  # the model's own default applies


@pytest.mark.parametrize(("seq_len", "expected_seq"), [(None, 4 * 6), (4096, 4096)])
def test_flow_resolution_shift_uses_the_model_sequence_length(seq_len, expected_seq):
    sched = FlowScheduler(FlowConfig(dynamic_shift="flux1"))
    model = LinearModel("flow", seq_len=seq_len)
    generate(model, sched, batch={"labels": torch.tensor([1.0])}, height=8, width=12, steps=6)
    expected = sched.sampling_schedule(6, seq_len=expected_seq).timesteps
    got = torch.tensor([s["t"].item() for s in model.seen], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_generate_rejects_sizes_off_the_latent_grid():
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(
            LinearModel(), DDPMScheduler(), batch={"labels": torch.tensor([1])}, height=7, width=8, steps=2
        )


def test_png_and_grid_helpers(tmp_path):
    pixels = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    paths = save_png(pixels, tmp_path)
    assert [p.name for p in paths] == ["sample-000.png", "sample-001.png"]
    img = np.asarray(Image.open(paths[1]))
    assert img.shape == (4, 5, 3) and img[-1, -1, -1] == 255
    grid = image_grid(to_pil(torch.cat([pixels, pixels, pixels])), columns=2)
    assert grid.size == (10, 12)


# -- the command ----------------------------------------------------------------------------------
def _trained_output(tmp_path: Path, **sections) -> tuple[Path, object]:
    """An output dir as training leaves it: job.yaml and final/ weights (random, not trained)."""
    out = tmp_path / "run"
    job = tiny_job(out, **sections)
    out.mkdir()
    (out / "job.yaml").write_text(yaml.safe_dump(job))
    model = diffcore.load_model("example-tiny", width=16, num_classes=4)
    torch.manual_seed(5)
    for p in model.backbone.parameters():
        p.data.normal_(0, 0.2)
    for folder in (out / "final", out / "checkpoints" / "step-2"):
        folder.mkdir(parents=True)
        save_safetensors(model.backbone.state_dict(), folder / "model.safetensors")
    return out, model


def test_sample_from_output_matches_generate(tmp_path):
    out, model = _trained_output(tmp_path)
    dest = tmp_path / "imgs"
    argv = ["sample", "--from", str(out), "--label", "1", "--label", "3", "--count", "2", "--steps", "4"]
    assert (
        main(argv + ["--sampler", "dpmpp_2m", "--guidance", "2", "--out", str(dest), "--device", "cpu"]) == 0
    )
    files = sorted(p.name for p in dest.iterdir())
    assert files == ["grid.png", "sample-000-label1-seed0.png", "sample-001-label1-seed1.png",
                     "sample-002-label3-seed2.png", "sample-003-label3-seed3.png"]
    # the same images as generate() on the same weights (what the training callback calls)
    sched = diffcore.load_scheduler("ddpm", beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pixels = generate(
        model,
        sched,
        batch={"labels": torch.tensor([1, 1, 3, 3])},
        height=8,
        width=8,
        steps=4,
        sampler="dpmpp_2m",
        guidance=2.0,
        seed=[0, 1, 2, 3],
    )
    want = np.asarray(to_pil(pixels[2:3])[0])
    image = Image.open(dest / "sample-002-label3-seed2.png")
    assert np.array_equal(np.asarray(image), want)
    # what made the image travels with it
    assert {k: image.text[k] for k in ("label", "seed", "sampler", "steps", "guidance")} == {
        "label": "3", "seed": "2", "sampler": "dpmpp_2m", "steps": "4", "guidance": "2.0"}
    assert Image.open(dest / "grid.png").size == (16, 16)


@pytest.mark.parametrize("sampler", ["euler_a", "ddim"])
def test_an_images_seed_does_not_depend_on_the_batch_size(tmp_path, sampler):
    """euler_a draws noise at every step: each image keeps its own stream whatever batch it is in."""
    out, _ = _trained_output(tmp_path)
    found = {}
    for batch in (1, 3):
        dest = tmp_path / f"b{batch}"
        argv = ["sample", "--from", str(out), "--label", "1", "--label", "2", "--count", "2", "--steps", "3",
                "--sampler", sampler, "--eta", "1", "--seed", "7", "--batch-size", str(batch), "--out", str(dest),
                "--device", "cpu", "--no-grid"]
        assert main(argv) == 0
        found[batch] = {p.name: np.asarray(Image.open(p)) for p in dest.iterdir()}
    assert found[1].keys() == found[3].keys() and len(found[1]) == 4
    for name in found[1]:
        assert np.array_equal(found[1][name], found[3][name]), name


def test_a_label_out_of_range_names_the_flag(tmp_path, capsys):
    out, _ = _trained_output(tmp_path)
    assert main(["sample", "--from", str(out), "--label", "12", "--steps", "2", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "diffcore: error: --label: label 12 is out of range: the model has 4 classes (give a label from 0 to 3)\n"
    )


def test_sample_from_a_checkpoint_and_with_an_adapter(tmp_path):
    out, model = _trained_output(tmp_path)
    adapter = diffcore.build_component("adapter", "lora", {"rank": 2})
    adapter.attach(model)
    for p in adapter.parameters():
        p.data.normal_(0, 0.5)
    adapter.save(tmp_path / "style.safetensors")
    common = ["sample", "--from", str(out), "--label", "2", "--steps", "3", "--device", "cpu", "--no-grid"]
    assert main(common + ["--checkpoint", "step-2", "--out", str(tmp_path / "a")]) == 0
    assert (
        main(common + ["--out", str(tmp_path / "b"), "--adapter", f"{tmp_path / 'style.safetensors'}:0.8"])
        == 0
    )
    assert (
        main(common + ["--out", str(tmp_path / "c"), "--adapter", f"{tmp_path / 'style.safetensors'}:0"]) == 0
    )
    plain = np.asarray(Image.open(next((tmp_path / "a").glob("sample-000*.png"))))
    styled = np.asarray(Image.open(next((tmp_path / "b").glob("sample-000*.png"))))
    off = np.asarray(Image.open(next((tmp_path / "c").glob("sample-000*.png"))))
    assert not (tmp_path / "a" / "grid.png").exists()
    assert not np.array_equal(plain, styled) and np.array_equal(plain, off)


def test_sample_from_a_model_type(tmp_path):
    argv = ["sample", "--model", "example-tiny", "--model-option", "width=16", "--label", "0", "--steps", "2"]
    assert main(argv + ["--height", "8", "--out", str(tmp_path), "--sampler", "heun", "--device", "cpu"]) == 0
    assert (next(tmp_path.glob("sample-000*.png"))).is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give exactly one of --model TYPE, --job JOB.yaml or --from OUTPUT_DIR"),
        (["--from", "OUT", "--checkpoint", "step-9"], "available: final, step-2"),
        (["--from", "OUT", "--sampler", "plms"], "--sampler: unknown sampler 'plms'"),
        (
            ["--from", "OUT", "--adapter", "missing.safetensors:0.5"],
            "adapter file 'missing.safetensors' not found",
        ),
        (["--model", "example-tiny", "--pretrained", "nowhere"], "--pretrained: nowhere does not exist"),
        (["--model", "exampel-tiny"], "example-tiny"),
    ],
)
def test_sample_user_errors(tmp_path, capsys, extra, message):
    out, _ = _trained_output(tmp_path)
    argv = ["sample", "--label", "1", "--steps", "2"] + [str(out) if a == "OUT" else a for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffcore: error:") and message in err, err


def test_sample_needs_something_to_generate(tmp_path, capsys):
    out, _ = _trained_output(tmp_path)
    assert main(["sample", "--from", str(out)]) == 2
    assert "nothing to generate" in capsys.readouterr().err
