"""The textual_inversion method: the saved embedding loads with diffusers' load_textual_inversion into
tiny SD1.5 and SDXL pipelines and gives diffcore's prompt embeddings; only the new vectors train
under ZeRO-2 with AdamW weight decay (every table row and the UNet stay bit-identical); bad input."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffcore_textual_inversion import plugin
from diffcore_textual_inversion.config import TextualInversionConfig
from diffcore_textual_inversion.method import TextualInversionMethod
from safetensors.torch import load_file, save_file

import diffcore
from diffcore.testing import assert_entry_points_light, run_cli, run_job
from diffcore.testing.tiny_sd import write_pipeline
from diffcore.weights import load_into

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("diffcore_sdxl")
from diffcore_sdxl import plugin as sdxl_plugin  # noqa: E402

PROMPT = "a photo of <toy> on a table"


def test_entry_module_is_light() -> None:
    assert assert_entry_points_light("diffcore-textual-inversion") == ["diffcore_textual_inversion.plugin"]


def method(**options) -> TextualInversionMethod:
    return TextualInversionMethod(TextualInversionConfig(**{"placeholder_token": "<toy>", "initializer_token": "cat", **options}))


def reference_pipeline(family: str, parts: dict):
    scheduler = diffusers.DDIMScheduler()
    if family == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=None, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
        tokenizer_2=parts["tokenizer_2"], unet=parts["unet"], scheduler=scheduler,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_embedding_loads_into_diffusers_with_the_same_prompt_embeddings(tmp_path: Path, family: str) -> None:
    parts = write_pipeline(tmp_path / family, family)
    model = diffcore.load_model(family, pretrained=str(tmp_path / family), autoencoder=False)
    ti = method(num_vectors=2)
    module = ti.modules(model)["embeddings"]
    keys = {"sd15": {"emb_params": (2, 64)}, "sdxl": {"clip_l": (2, 64), "clip_g": (2, 128)}}[family]
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == keys
    # trained-looking vectors, far from their initialisation, loaded as `diffcore sample` loads them
    g = torch.Generator().manual_seed(1)
    trained = {k: v.detach() + torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}
    load_into(module, trained, where="embeddings.safetensors")
    file = tmp_path / "embeddings.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(file))

    pipe = reference_pipeline(family, parts)
    if family == "sd15":
        pipe.load_textual_inversion(str(file), token="<toy>")
    else:
        state = load_file(str(file))
        pipe.load_textual_inversion(state["clip_l"], token="<toy>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token="<toy>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        ours = model.encode_conditions({"captions": [ti.expand(PROMPT)]})
        plain = model.encode_conditions({"captions": ["a photo of cat cat on a table"]})
        if family == "sd15":
            embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
            assert (ours["pooled"] - pooled).abs().max() < 1e-5
    assert ours["context"].shape == embeds.shape
    assert (ours["context"] - embeds).abs().max() < 1e-5
    assert (ours["context"] - plain["context"]).abs().max() > 1e-2  # the new vectors are what is read


def captioned_folder(root: Path, n: int = 4) -> Path:
    from PIL import Image, ImageDraw

    root.mkdir()
    for i in range(n):
        image = Image.new("RGB", (16, 16), "black")
        ImageDraw.Draw(image).rectangle([2 + i, 3, 10 + i, 12], fill=("red", "green")[i % 2])
        image.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a photo of <toy>")
    return root


def ti_job(tmp_path: Path, steps: int, every: int) -> dict:
    return {
        "name": "ti",
        "seed": 0,
        "model": {"type": "sd15", "pretrained": str(tmp_path / "sd15"), "resolution": 16},
        "method": {"type": "textual_inversion", "placeholder_token": "<toy>", "initializer_token": "cat"},
        "data": {"type": "folder", "path": str(tmp_path / "data"), "resolution": 16, "buckets": False, "bucket_step": 16},
        "train": {"steps": steps, "batch_size": 2, "lr": 0.05, "checkpoint_every": every,
                  "optimizer": {"type": "adamw", "weight_decay": 0.1}, "deepspeed": {"zero_stage": 2}},
    }  # fmt: skip


def plugins_with_vae() -> list:
    pytest.importorskip("diffcore_vae")
    from diffcore_vae import plugin as vae_plugin

    return [plugin, sdxl_plugin, vae_plugin]


@pytest.mark.slow
def test_only_the_new_vectors_train_under_zero2(tmp_path: Path) -> None:
    parts = write_pipeline(tmp_path / "sd15", "sd15", with_vae=True)
    captioned_folder(tmp_path / "data")
    run = run_job(ti_job(tmp_path, 3, 3), tmp_path / "out", plugins=plugins_with_vae())
    table = parts["text_encoder"].get_input_embeddings().weight.detach()
    cat = parts["tokenizer"]("cat", add_special_tokens=False).input_ids
    initial = table[cat].mean(0, keepdim=True)
    trained = run.weights("embeddings")
    assert set(trained) == {"emb_params"} and trained["emb_params"].shape == (1, 64)
    assert (trained["emb_params"] - initial).abs().max() > 1e-3
    assert torch.equal(run.weights("embeddings", "step-3")["emb_params"], trained["emb_params"])

    # DeepSpeed's own checkpoint holds the text encoder it wrapped: every row of its table and every
    # other weight is bit-identical after AdamW with weight decay, and so is the exported UNet
    states = list((run.output_dir / "checkpoints" / "step-3").rglob("*model_states.pt"))
    assert len(states) == 1
    saved = torch.load(states[0], map_location="cpu", weights_only=True)["module"]
    te = {k.split("te1.", 1)[1]: v for k, v in saved.items() if ".te1." in k or k.startswith("te1.")}
    weight = next(v for k, v in te.items() if k.endswith("token_embedding.weight"))
    assert torch.equal(weight, table)
    original = parts["text_encoder"].state_dict()
    assert set(original) <= set(te)
    for key, value in original.items():
        assert torch.equal(te[key], value), key
    assert torch.equal(next(v for k, v in te.items() if k.endswith("new_tokens.vectors")), trained["emb_params"])
    unet = diffcore.load_model("sd15", pretrained=str(tmp_path / "sd15"), autoencoder=False).export_state_dict()
    exported = run.weights("model")
    assert exported.keys() == unet.keys() and all(torch.equal(exported[k], unet[k]) for k in unet)


def test_bad_input(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "sd15", "sd15")
    model = diffcore.load_model("sd15", pretrained=str(tmp_path / "sd15"), autoencoder=False)
    with pytest.raises(diffcore.UserError, match="'a' already exists in the clip_l tokenizer") as err:
        method(placeholder_token="a").modules(model)
    assert err.value.where == "$.method.placeholder_token"
    with pytest.raises(diffcore.UserError, match=r"unknown token tables \['clip_g'\]") as err:
        method(tables=["clip_g"]).modules(model)
    assert err.value.where == "$.method.tables" and "clip_l" in str(err.value.hint)
    pytest.importorskip("diffcore_dit")
    dit = diffcore.load_model("dit", hidden_size=32, depth=1, num_heads=2, patch_size=4, in_channels=3, input_size=8, num_classes=2)
    with pytest.raises(diffcore.UserError, match="dit exposes no token embeddings") as err:
        method().modules(dit)
    assert err.value.where == "$.model.type"
    job = SimpleNamespace(data=SimpleNamespace(config=SimpleNamespace(cache_dir="cache")))
    problems = method(placeholder_token="my token", initializer_token=" ", num_vectors=0).validate(job)
    assert [p.path for p in problems] == [
        "$.method.placeholder_token", "$.method.initializer_token", "$.method.num_vectors", "$.data.cache_dir",
    ]  # fmt: skip
    job.data.config.cache_dir = None
    assert method().validate(job) == []


def test_an_existing_placeholder_exits_2(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "sd15", "sd15")
    job = {
        "model": {"type": "sd15", "pretrained": str(tmp_path / "sd15"), "autoencoder": False, "resolution": 16},
        "method": {"type": "textual_inversion", "placeholder_token": "cat</w>", "initializer_token": "cat"},
        "data": {"type": "synthetic", "resolution": 16, "size": 4},
        "train": {"steps": 1, "batch_size": 2},
    }
    run = run_job(job, tmp_path / "out", spawn=True, expect_exit=2, plugins=["diffcore_textual_inversion.plugin", "diffcore_sdxl.plugin"])
    assert "$.method.placeholder_token" in run.stderr and "'cat</w>' already exists" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_resumes_exactly_and_samples(tmp_path: Path) -> None:
    write_pipeline(tmp_path / "sd15", "sd15", with_vae=True)
    captioned_folder(tmp_path / "data")
    straight = run_job(ti_job(tmp_path, 2, 1), tmp_path / "straight", plugins=plugins_with_vae())
    run_job(ti_job(tmp_path, 1, 1), tmp_path / "split", plugins=plugins_with_vae())
    resumed = run_job(ti_job(tmp_path, 2, 1), tmp_path / "split", plugins=plugins_with_vae(), resume=True)
    assert resumed.losses == straight.losses
    assert torch.equal(resumed.weights("embeddings")["emb_params"], straight.weights("embeddings")["emb_params"])
    assert not torch.equal(straight.weights("embeddings", "step-1")["emb_params"], straight.weights("embeddings")["emb_params"])

    # diffcore sample rebuilds the tokens through the method and loads embeddings.safetensors into them
    out = tmp_path / "samples"
    args = ["sample", "--from", str(straight.output_dir), "--prompt", "a photo of <toy>", "--steps", "2", "--height", "16"]
    done = run_cli(*args, "--out", str(out), "--device", "cpu", plugins=["diffcore_textual_inversion.plugin", "diffcore_sdxl.plugin", "diffcore_vae.plugin"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len([p for p in out.glob("*.png") if p.name != "grid.png"]) == 1
