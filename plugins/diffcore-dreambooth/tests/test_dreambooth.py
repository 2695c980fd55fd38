"""The dreambooth method: its loss against the default method and the hand-computed sum, the class
folder checks, and a tiny DiT run that generates its class images, is killed mid-generation,
resumes exactly (generation and training) and exports."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import attrs
import numpy as np
import pytest
import torch
from diffcore_dreambooth import class_images, plugin
from diffcore_dreambooth import method as method_module
from diffcore_dreambooth.config import DreamBoothConfig
from diffcore_dreambooth.method import DreamBoothMethod
from PIL import Image

import diffcore
from diffcore.context import StepRandom
from diffcore.methods.config import DiffusionMethodConfig
from diffcore.methods.diffusion import DiffusionMethod
from diffcore.testing import assert_entry_points_light, fake_context, first_batch, run_job

pytest.importorskip("diffcore_dit")
from diffcore_dit import plugin as dit_plugin  # noqa: E402

TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2, patch_size=4, in_channels=3, input_size=16, num_classes=4)


def test_entry_module_is_light() -> None:
    assert assert_entry_points_light("diffcore-dreambooth") == ["diffcore_dreambooth.plugin"]


def tiny_dit() -> diffcore.model.DiffusionModel:
    torch.manual_seed(0)
    return diffcore.load_model("dit", **TINY_DIT)


def shapes(n: int = 4):
    return diffcore.build_component("dataset", "synthetic", {"resolution": 16, "size": 8})


def write_class_folder(folder: Path, n: int, size: int = 16) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # sizes other than the class size: loading scales to cover and centre-crops
        pixels = rng.integers(0, 256, (size + 4 * i, size + 2, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"dog-{i}.png")
        paths.append(folder / f"dog-{i}.png")
    return paths


def test_prior_weight_zero_is_the_default_method() -> None:
    dataset = shapes()
    batch = first_batch(dataset, 4)
    base = DiffusionMethodConfig(condition_dropout=0.2)
    default = fake_context(tiny_dit(), method=DiffusionMethod(base), dataset=dataset, micro_step=3)
    want, _ = default.method.loss(default, batch)
    config = DreamBoothConfig(condition_dropout=0.2, prior_loss_weight=0.0, class_label=1)
    ctx = fake_context(tiny_dit(), method=DreamBoothMethod(config), dataset=dataset, micro_step=3)
    got, logs = ctx.method.loss(ctx, batch)
    assert logs == {}
    assert got.item() == want.item()


def test_prior_loss_is_the_hand_computed_sum(tmp_path: Path) -> None:
    dataset = shapes()
    batch = first_batch(dataset, 4)
    write_class_folder(tmp_path / "dogs", 3)
    config = DreamBoothConfig(prior_loss_weight=0.7, class_label=2, class_dir=str(tmp_path / "dogs"), num_class_images=3, generate=False)
    model = tiny_dit()
    ctx = fake_context(model, method=DreamBoothMethod(config), dataset=dataset, micro_step=5, output_dir=tmp_path / "out")
    loss, logs = ctx.method.loss(ctx, batch)

    # the same draws by hand: the instance part, the class picks, then the class part
    reference = DiffusionMethod(DiffusionMethodConfig())
    ctx.step_random = StepRandom(0, 5)
    instance = reference.denoising_loss(ctx, batch)
    picks = ctx.step_random.call(lambda n, g: torch.randint(3, (n,), generator=g), 4).tolist()
    assert len(set(picks)) > 1  # the pairing is not degenerate for this seed
    files = sorted((tmp_path / "dogs").glob("*.png"))
    pixels = []
    for i in picks:
        image = Image.open(files[i]).convert("RGB")
        w, h = image.size
        scale = max(16 / h, 16 / w)
        image = image.resize((max(16, round(w * scale)), max(16, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (image.width - 16) // 2, (image.height - 16) // 2
        image = image.crop((left, top, left + 16, top + 16))
        pixels.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    prior = reference.denoising_loss(ctx, {"pixels": torch.stack(pixels), "labels": torch.full((4,), 2)})
    assert abs(loss.item() - (instance.item() + 0.7 * prior.item())) < 1e-6
    assert logs["instance_loss"].item() == instance.item()
    assert abs(logs["prior_loss"].item() - prior.item()) < 1e-6
    assert prior.item() != instance.item()


def test_section_problems(tmp_path: Path) -> None:
    job = SimpleNamespace(output_dir=str(tmp_path), data=SimpleNamespace(config=SimpleNamespace(cache_dir=None)))
    problems = DreamBoothMethod(DreamBoothConfig()).validate(job)
    assert [p.path for p in problems] == ["$.method.class_prompt"]
    assert "class_label" in problems[0].message
    write_class_folder(tmp_path / "few", 2)
    config = DreamBoothConfig(class_prompt="a dog", class_dir=str(tmp_path / "few"), num_class_images=5, generate=False)
    problems = DreamBoothMethod(config).validate(job)
    assert [p.path for p in problems] == ["$.method.class_dir"]
    assert "holds 2 class images" in problems[0].message and "num_class_images asks for 5" in problems[0].message
    problems = DreamBoothMethod(DreamBoothConfig(class_label=0, generate=False, num_class_images=0)).validate(job)
    assert [p.path for p in problems] == ["$.method.num_class_images", "$.method.class_dir"]
    assert [p.path for p in DreamBoothMethod(DreamBoothConfig(prior_loss_weight=-1)).validate(job)] == ["$.method.prior_loss_weight"]
    assert DreamBoothMethod(DreamBoothConfig(prior_loss_weight=0, generate=False)).validate(job) == []
    cached = SimpleNamespace(output_dir=str(tmp_path), data=SimpleNamespace(config=SimpleNamespace(cache_dir="cache")))
    assert DreamBoothMethod(DreamBoothConfig(prior_loss_weight=0)).validate(cached) == []
    problems = DreamBoothMethod(DreamBoothConfig(prior_loss_weight=0, train_text_encoder=True)).validate(cached)
    assert [p.path for p in problems] == ["$.data.cache_dir"]


def test_a_manifest_with_other_settings_is_refused(tmp_path: Path) -> None:
    settings = class_images.Generation(
        prompt=None, label=1, height=16, width=16, sampler="euler", steps=2, guidance=5.0, batch=2, seed=0,
        architecture="dit", base_model="",
    )  # fmt: skip
    given, planned = class_images.plan(tmp_path, 3, settings)
    assert given == [] and [(e["file"], e["batch"]) for e in planned] == [("class-00000.png", 0), ("class-00001.png", 0), ("class-00002.png", 1)]
    class_images.write_manifest(tmp_path, settings, planned)
    with pytest.raises(diffcore.UserError, match=r"other settings \(label: 1 there, 3 now\)"):
        class_images.plan(tmp_path, 3, attrs.evolve(settings, label=3))


def dit_job(tmp_path: Path, steps: int, **method) -> dict:
    return {
        "name": "dreambooth-dit",
        "seed": 3,
        "model": {"type": "dit", **TINY_DIT},
        "method": {
            "type": "dreambooth",
            "class_label": 2,
            "class_dir": str(tmp_path / "classes"),
            "num_class_images": 6,
            "generation_batch": 4,
            "sample_steps": 2,
            "guidance": 2.0,
            **method,
        },
        "data": {"type": "synthetic", "resolution": 16, "size": 8},
        "train": {
            "steps": steps,
            "batch_size": 2,
            "lr": 1e-3,
            "checkpoint_every": 2,
            "log_every": 1,
            "deepspeed": {"zero_stage": 2},
        },
    }


PLUGINS = [plugin, dit_plugin]


@pytest.mark.slow
def test_generates_trains_resumes_exactly_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight_dir = tmp_path / "straight"
    straight = run_job(dit_job(straight_dir, 4), straight_dir / "out", plugins=PLUGINS)
    classes = sorted(p.name for p in class_images.list_images(straight_dir / "classes"))
    assert classes == [f"class-{i:05d}.png" for i in range(6)]
    assert {"instance_loss", "prior_loss"} <= set(straight.metrics[0])
    assert (straight.output_dir / "final" / "model.safetensors").is_file()

    # killed while generating: after the first batch of four images
    split_dir = tmp_path / "split"
    real, calls = method_module.make_class_batch, []

    def dies_after_one(ctx, settings, n, seed):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(n)
        return real(ctx, settings, n, seed)

    monkeypatch.setattr(method_module, "make_class_batch", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_job(dit_job(split_dir, 2), split_dir / "out", plugins=PLUGINS)
    assert len(class_images.list_images(split_dir / "classes")) == 4

    made = []
    monkeypatch.setattr(method_module, "make_class_batch", lambda *a: made.append(a[2]) or real(*a))
    run_job(dit_job(split_dir, 2), split_dir / "out", plugins=PLUGINS, resume=True)
    assert made == [2]  # only the missing batch
    for name in classes:
        assert (split_dir / "classes" / name).read_bytes() == (straight_dir / "classes" / name).read_bytes()
    resumed = run_job(dit_job(split_dir, 4), split_dir / "out", plugins=PLUGINS, resume=True)
    assert made == [2]  # the next run reuses the cached images
    assert [row["step"] for row in resumed.metrics] == [1, 2, 3, 4]
    assert resumed.losses == straight.losses
    for key, value in straight.weights("model").items():
        assert torch.equal(resumed.weights("model")[key], value), key


def test_a_short_class_folder_without_generation_exits_2(tmp_path: Path) -> None:
    write_class_folder(tmp_path / "classes", 2)
    job = dit_job(tmp_path, 1, generate=False, num_class_images=3)
    run = run_job(job, tmp_path / "out", spawn=True, expect_exit=2, plugins=["diffcore_dreambooth.plugin", "diffcore_dit.plugin"])
    assert "$.method.class_dir" in run.stderr and "holds 2 class images" in run.stderr
    assert "Traceback" not in run.stderr


def instance_folder(root: Path, caption: str, n: int = 2) -> Path:
    root.mkdir()
    for i in range(n):
        pixels = np.zeros((16, 16, 3), dtype=np.uint8)
        pixels[3 + i : 11 + i, 4:12] = (200, 40 * i, 30)
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


@pytest.mark.slow
def test_sd15_with_a_lora_and_its_text_encoder(tmp_path: Path) -> None:
    """The UNet family: a class prompt, generated class images, a LoRA on the UNet and the whole
    text encoder training, under ZeRO-2; the text encoder is exported in the diffusers layout."""
    pytest.importorskip("diffcore_lora")
    pytest.importorskip("diffcore_sdxl")
    pytest.importorskip("diffcore_vae")
    from diffcore_lora import plugin as lora_plugin
    from diffcore_sdxl import plugin as sdxl_plugin
    from diffcore_vae import plugin as vae_plugin

    from diffcore.testing.tiny_sd import write_pipeline

    parts = write_pipeline(tmp_path / "sd15", "sd15", with_vae=True)
    job = {
        "name": "dreambooth-sd15",
        "model": {"type": "sd15", "pretrained": str(tmp_path / "sd15"), "resolution": 16},
        "adapter": {"type": "lora", "rank": 2},
        "method": {
            "type": "dreambooth", "class_prompt": "a photo of a toy", "num_class_images": 2, "generation_batch": 2,
            "sample_steps": 2, "train_text_encoder": True,
        },
        "data": {"type": "folder", "path": str(instance_folder(tmp_path / "data", "a photo of sks toy")), "resolution": 16,
                 "buckets": False, "bucket_step": 16},
        "train": {"steps": 2, "batch_size": 1, "lr": 1e-3, "deepspeed": {"zero_stage": 2}},
    }  # fmt: skip
    run = run_job(job, tmp_path / "out", plugins=[plugin, sdxl_plugin, vae_plugin, lora_plugin])
    folder = run.output_dir / "class_images"
    assert [p.name for p in class_images.list_images(folder)] == ["class-00000.png", "class-00001.png"]
    manifest = class_images.read_manifest(folder)
    assert manifest is not None and manifest["settings"]["prompt"] == "a photo of a toy"
    assert Image.open(folder / "class-00000.png").size == (16, 16)
    assert all(row["prior_loss"] > 0 for row in run.metrics)
    assert (run.output_dir / "final" / "adapter.safetensors").is_file()
    trained = run.weights("text_encoder")
    original = parts["text_encoder"].state_dict()
    assert set(trained) == set(original)
    assert any(not torch.equal(trained[k], original[k]) for k in original)


@pytest.mark.slow
def test_two_processes_share_the_generation(tmp_path: Path) -> None:
    """Under torchrun each rank makes its share of the class batches; the images are those one
    process makes, and the run's losses are one process's with the same global batch."""
    one = run_job(dit_job(tmp_path / "one", 2), tmp_path / "one" / "out", plugins=PLUGINS)
    job = dit_job(tmp_path / "two", 2)
    job["train"]["batch_size"] = 1
    two = run_job(job, tmp_path / "two" / "out", processes=2, plugins=["diffcore_dreambooth.plugin", "diffcore_dit.plugin"])
    names = [p.name for p in class_images.list_images(tmp_path / "one" / "classes")]
    assert names == [p.name for p in class_images.list_images(tmp_path / "two" / "classes")] and len(names) == 6
    for name in names:
        assert (tmp_path / "two" / "classes" / name).read_bytes() == (tmp_path / "one" / "classes" / name).read_bytes()
    assert two.losses == pytest.approx(one.losses, rel=1e-4)


@pytest.mark.slow
def test_flux1_generates_its_prior_and_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flux.1 dev (distilled guidance): the class images are generated with the guidance as the
    model's input, and a full finetune trains on instance + class examples under ZeRO-2."""
    pytest.importorskip("diffcore_flux")
    pytest.importorskip("diffcore_vae")
    flux_tests = Path(__file__).parents[2] / "diffcore-flux" / "tests"
    if not (flux_tests / "_flux_tiny.py").is_file():
        pytest.skip("diffcore-flux's tiny pipeline helper is not beside this plugin")
    monkeypatch.syspath_prepend(str(flux_tests))
    from _flux_tiny import AXES, LATENT_CHANNELS, write_pipeline
    from diffcore_flux import plugin as flux_plugin
    from diffcore_vae import plugin as vae_plugin

    write_pipeline(tmp_path / "flux", guidance=True)
    vae = dict(block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=LATENT_CHANNELS)
    job = {
        "name": "dreambooth-flux",
        "model": {"type": "flux", "pretrained": str(tmp_path / "flux"), "axes_dim": AXES, "max_sequence_length": 8, "vae_options": vae},
        "method": {
            "type": "dreambooth", "class_prompt": "a dog", "num_class_images": 2, "generation_batch": 2,
            "sample_steps": 2, "guidance": 3.5,
        },
        "data": {"type": "folder", "path": str(instance_folder(tmp_path / "data", "a sks dog")), "resolution": 16,
                 "buckets": False, "bucket_step": 16},
        "train": {"steps": 2, "batch_size": 1, "lr": 1e-3, "deepspeed": {"zero_stage": 2}},
    }  # fmt: skip
    run = run_job(job, tmp_path / "out", plugins=[plugin, flux_plugin, vae_plugin])
    folder = run.output_dir / "class_images"
    assert len(class_images.list_images(folder)) == 2
    assert Image.open(folder / "class-00001.png").size == (16, 16)
    manifest = class_images.read_manifest(folder)
    assert manifest is not None and manifest["settings"]["guidance"] == 3.5 and manifest["settings"]["architecture"] == "flux"
    assert all(row["prior_loss"] > 0 for row in run.metrics)
    assert (run.output_dir / "final" / "model.safetensors").is_file()


def test_generated_folder_reused_without_generation(tmp_path: Path) -> None:
    """A folder of generated images serves a later job with generate: false, whatever its
    manifest says; one with too few images is refused at set-up too."""
    settings = class_images.Generation(
        prompt=None, label=1, height=16, width=16, sampler="euler", steps=2, guidance=5.0, batch=2, seed=0,
        architecture="dit", base_model="",
    )  # fmt: skip
    _, planned = class_images.plan(tmp_path / "classes", 3, settings)
    class_images.write_manifest(tmp_path / "classes", settings, planned)
    for entry in planned:
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "classes" / entry["file"])
    dataset = shapes()
    config = DreamBoothConfig(class_label=3, class_dir=str(tmp_path / "classes"), num_class_images=3, generate=False)
    ctx = fake_context(tiny_dit(), method=DreamBoothMethod(config), dataset=dataset, output_dir=tmp_path / "out")
    assert [p.name for p in ctx.method.class_paths] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    config = attrs.evolve(config, num_class_images=4)
    with pytest.raises(diffcore.UserError, match="holds 3 class images but 4 are asked") as err:
        fake_context(tiny_dit(), method=DreamBoothMethod(config), dataset=dataset, output_dir=tmp_path / "out")
    assert err.value.where == "$.method.class_dir"
