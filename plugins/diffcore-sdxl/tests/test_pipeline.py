"""encode_conditions + predict against diffusers' SDXL prompt encoding and UNet call; layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sdxl_tiny import make_sd15_pipeline, make_sdxl_pipeline

import diffcore
from diffcore.errors import UserError

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of the cat", "an astronaut, riding the horse at dawn"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    unet, te1, te2, tok1, tok2 = make_sdxl_pipeline(folder)
    model = diffcore.load_model("sdxl", pretrained=str(folder), autoencoder=False)
    return folder, model, (unet, te1, te2, tok1, tok2)


def _latents(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(3))


def _reference(parts, prompts, latents, t, time_ids):
    unet, te1, te2, tok1, tok2 = parts
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(),
    )
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        out = unet(latents, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return embeds, pooled, out


def test_sdxl_conditions_and_prediction_match_diffusers(sdxl) -> None:
    _, model, parts = sdxl
    latents, t = _latents(), torch.tensor([999.0, 250.0])
    batch = {
        "captions": PROMPTS,
        "latents": latents,
        "original_size": [(96, 128), (128, 128)],
        "crop_coords": [(0, 8), (16, 0)],
    }
    with torch.no_grad():
        cond = model.encode_conditions(batch)
        got = model.predict(latents, t, cond)
    time_ids = torch.tensor([[96.0, 128, 0, 8, 128, 128], [128, 128, 16, 0, 128, 128]])
    embeds, pooled, want = _reference(parts, PROMPTS, latents, t, time_ids)
    torch.testing.assert_close(cond["time_ids"], time_ids)
    assert (cond["context"] - embeds).abs().max() < 1e-5
    assert (cond["pooled"] - pooled).abs().max() < 1e-5
    assert (got - want).abs().max() < 1e-4


def test_size_conditioning_defaults_to_the_image_size(sdxl) -> None:
    _, model, _ = sdxl
    with torch.no_grad():
        cond = model.encode_conditions({"captions": ["x"], "pixels": torch.zeros(1, 3, 64, 48)})
        assert cond["time_ids"].tolist() == [[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]]
        cond = model.encode_conditions({"captions": ["x"], "latents": torch.zeros(1, 4, 8, 8)})
        assert cond["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
        cond = model.encode_conditions({"captions": ["x"]})
        assert cond["time_ids"][0, 0].item() == model.config.resolution


def test_long_prompts_use_75_token_windows(sdxl) -> None:
    _, model, _ = sdxl
    long = " ".join(["a"] * 100)  # 100 one-token words: two windows
    first = " ".join(["a"] * 75)
    with torch.no_grad():
        cond = model.encode_conditions({"captions": [long, "dog"]})
        ref = model.encode_conditions({"captions": [first]})
    assert cond["context"].shape[:2] == (2, 154)
    # the first window is the first 75 tokens on their own; the pooled embedding is the first window's
    torch.testing.assert_close(cond["context"][0, :77], ref["context"][0])
    torch.testing.assert_close(cond["pooled"][0], ref["pooled"][0])


def test_single_file_roundtrip_gives_same_outputs(sdxl, tmp_path: Path) -> None:
    folder, model, _ = sdxl
    file = model.save_pretrained(tmp_path / "sdxl.safetensors", layout="original")
    again = diffcore.load_model(
        "sdxl",
        pretrained=str(file),
        tokenizer=str(folder / "tokenizer"),
        tokenizer_2=str(folder / "tokenizer_2"),
        autoencoder=False,
    )
    assert again.unet_config == model.unet_config
    latents, t = _latents(), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        a = model.predict(latents, t, model.encode_conditions({"captions": PROMPTS}))
        b = again.predict(latents, t, again.encode_conditions({"captions": PROMPTS}))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and back to a diffusers folder that diffusers itself loads
    out = again.save_pretrained(tmp_path / "folder")
    ref = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    torch.testing.assert_close(ref.state_dict()["conv_out.weight"], model.backbone.conv_out.weight)


def test_original_keys_agree_with_diffusers_conversion(sdxl) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    _, model, parts = sdxl
    unet, _, te2 = parts[0], parts[1], parts[2]
    original = model.export_state_dict("original")
    converted = convert_ldm_unet_checkpoint(dict(original), dict(unet.config))
    assert converted.keys() == unet.state_dict().keys()
    text = model._text_state("te2")
    hf = convert_open_clip_checkpoint(te2, dict(text), prefix="conditioner.embedders.1.model.")
    for key, value in hf.items():
        torch.testing.assert_close(value, te2.state_dict()[key])


def test_sd15_folder_and_single_file(tmp_path: Path) -> None:
    unet, te1, tok1 = make_sd15_pipeline(tmp_path / "sd15")
    model = diffcore.load_model("sd15", pretrained=str(tmp_path / "sd15"), autoencoder=False)
    assert model.prediction_type == "eps" and "te2" not in model.frozen
    pipe = diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=te1,
        tokenizer=tok1,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    latents, t = _latents(), torch.tensor([1.0, 900.0])
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        want = unet(latents, t, embeds).sample
        cond = model.encode_conditions({"captions": PROMPTS})
        got = model.predict(latents, t, cond)
    assert (cond["context"] - embeds).abs().max() < 1e-5
    assert (got - want).abs().max() < 1e-4
    file = model.save_pretrained(tmp_path / "sd15.safetensors", layout="original")
    again = diffcore.load_model(
        "sd15", pretrained=str(file), tokenizer=str(tmp_path / "sd15" / "tokenizer"), autoencoder=False
    )
    with torch.no_grad():
        torch.testing.assert_close(
            again.predict(latents, t, again.encode_conditions({"captions": PROMPTS})), got
        )


def test_single_file_without_tokenizer_is_a_user_error(sdxl, tmp_path: Path) -> None:
    _, model, _ = sdxl
    file = model.save_pretrained(tmp_path / "m.safetensors", layout="original")
    with pytest.raises(UserError, match=r"model\.tokenizer"):
        diffcore.load_model("sdxl", pretrained=str(file), autoencoder=False)


def test_adapter_keys_name_original_modules(sdxl) -> None:
    _, model, _ = sdxl
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert model.adapter_key(path, "original") == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert model.adapter_key(path, "diffusers") == path
    assert (
        model.adapter_key("up_blocks.0.attentions.2.proj_out", "original")
        == "output_blocks.2.1.proj_out"
    )
    import re

    names = [n for n, _ in model.backbone.named_modules()]
    targeted = [n for n in names if any(re.fullmatch(p, n) for p in model.adapter_targets)]
    assert path in targeted and "down_blocks.1.attentions.0.proj_in" in targeted
    assert not any("resnets" in n for n in targeted)
    assert all(re.search(p, path) for p in model.adapter_targets[:1])


def test_without_encoders_the_unet_alone_loads_and_predicts(sdxl, tmp_path: Path) -> None:
    """What training from a complete latent/text cache builds: no text encoders, no autoencoder."""
    folder, full, _ = sdxl
    bare = diffcore.load_model("sdxl", pretrained=str(folder), load_encoders=False)
    assert bare.frozen == {} and bare.autoencoder is None
    cond = full.encode_conditions({"captions": PROMPTS, "pixels": torch.zeros(2, 3, 128, 128)})
    x, t = _latents(), torch.tensor([10.0, 500.0])
    assert torch.equal(bare.predict(x, t, cond), full.predict(x, t, cond))
    full.save_pretrained(tmp_path / "single.safetensors", layout="original")
    from_file = diffcore.load_model("sdxl", pretrained=str(tmp_path / "single.safetensors"), load_encoders=False)
    assert from_file.frozen == {}
    torch.testing.assert_close(from_file.predict(x, t, cond), full.predict(x, t, cond), rtol=0, atol=1e-5)
