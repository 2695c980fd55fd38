"""encode_conditions + predict against diffusers' Flux and Flux Kontext pipeline logic."""

from __future__ import annotations

import pytest
import torch
from _flux_tiny import AXES, LATENT_CHANNELS, write_pipeline

import diffcore
from diffcore.errors import UserError

CAPTIONS = ["a cat", "a dog and a cat"]
MAX_LEN = 12


@pytest.fixture(scope="module", params=[("dev", True), ("schnell", False)], ids=["dev", "schnell"])
def pipeline(request, tmp_path_factory):
    variant, guidance = request.param
    root = tmp_path_factory.mktemp(variant)
    parts = write_pipeline(root, guidance)
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    cls = FluxKontextPipeline if variant == "dev" else FluxPipeline
    reference = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, **parts)
    model = diffcore.load_model(
        "flux", pretrained=root, variant=variant, axes_dim=AXES, max_sequence_length=MAX_LEN, kontext=True
    )
    return variant, reference, model


def _reference_velocity(reference, latents, t, guidance, ref_latents=None):
    b, c, h, w = latents.shape
    prompt_embeds, pooled, txt_ids = reference.encode_prompt(
        CAPTIONS, prompt_2=None, device="cpu", max_sequence_length=MAX_LEN
    )
    tokens = reference._pack_latents(latents, b, c, h, w)
    ids = reference._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    n = tokens.shape[1]
    if ref_latents is not None:  # FluxKontextPipeline: append the reference with id axis 0 set to 1
        rb, rc, rh, rw = ref_latents.shape
        tokens = torch.cat((tokens, reference._pack_latents(ref_latents, rb, rc, rh, rw)), dim=1)
        ref_ids = reference._prepare_latent_image_ids(b, rh // 2, rw // 2, "cpu", torch.float32)
        ref_ids[..., 0] = 1
        ids = torch.cat((ids, ref_ids), dim=0)
    with torch.no_grad():
        out = reference.transformer(
            hidden_states=tokens,
            timestep=t,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
    return out[:, :n]


def test_text_to_image_matches_diffusers(pipeline):
    variant, reference, model = pipeline
    from diffcore_flux.packing import pack

    latents = torch.randn(2, LATENT_CHANNELS, 6, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        cond = model.encode_conditions({"captions": CAPTIONS})
        ours = model.predict(latents, t, cond, guidance=3.5)
    assert ours.shape == latents.shape
    guidance = torch.full((2,), 3.5) if variant == "dev" else None
    expected = _reference_velocity(reference, latents, t, guidance)
    assert (pack(ours) - expected).abs().max() < 1e-4


def test_kontext_sequence_matches_diffusers(pipeline):
    variant, reference, model = pipeline
    from diffcore_flux.packing import pack

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, LATENT_CHANNELS, 6, 8, generator=g)
    ref_latents = torch.randn(2, LATENT_CHANNELS, 4, 10, generator=g)  # a reference of another size
    t = torch.tensor([0.5, 0.1])
    with torch.no_grad():
        cond = model.encode_conditions({"captions": CAPTIONS})
        plain = model.predict(latents, t, cond)
        ours = model.predict(latents, t, {**cond, "reference_latents": ref_latents})
    guidance = torch.full((2,), model.config.guidance) if variant == "dev" else None
    expected = _reference_velocity(reference, latents, t, guidance, ref_latents)
    assert (pack(ours) - expected).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3  # the reference really conditions the output


def test_training_facts(pipeline):
    variant, _, model = pipeline
    assert model.prediction_type == "flow"
    assert model.guidance_embedded == (variant == "dev")
    assert model.sequence_length(torch.zeros(1, LATENT_CHANNELS, 64, 96)) == 32 * 48
    assert set(model.frozen) == {"te1", "te2"}
    assert type(model.frozen["te1"]).__name__ == "CLIPTextModel"
    assert type(model.frozen["te2"]).__name__ == "T5EncoderModel"
    assert model.latent_channels == LATENT_CHANNELS
    expected = (
        {"type": "flow", "dynamic_shift": "flux1"}
        if variant == "dev"
        else {"type": "flow", "shift": 1.0, "sigma_spacing": "flux"}
    )
    assert model.default_scheduler == expected


def test_missing_tokenizer_is_a_user_error(tmp_path):
    write_pipeline(tmp_path, guidance=True)
    import shutil

    shutil.rmtree(tmp_path / "tokenizer_2")
    with pytest.raises(UserError, match="tokenizer 2 not found|no tokenizer 2") as info:
        diffcore.load_model("flux", pretrained=tmp_path, axes_dim=AXES)
    assert "tokenizer_2" in str(info.value)


def test_kontext_reference_pixels_go_through_the_autoencoder(tmp_path):
    pytest.importorskip("diffcore_vae")
    vae = dict(
        block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=LATENT_CHANNELS
    )
    write_pipeline(tmp_path, guidance=True)
    model = diffcore.load_model(
        "flux", pretrained=tmp_path, axes_dim=AXES, max_sequence_length=MAX_LEN, kontext=True, vae_options=vae
    )
    pixels = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        cond = model.encode_conditions({"captions": CAPTIONS, "reference": pixels})
        assert torch.equal(cond["reference_latents"], model.encode_images(pixels))
        assert cond["reference_latents"].shape == (2, LATENT_CHANNELS, 8, 12)
        out = model.predict(torch.randn(2, LATENT_CHANNELS, 8, 8), torch.tensor([0.5, 0.5]), cond)
    assert out.shape == (2, LATENT_CHANNELS, 8, 8)


def test_frozen_parts_load_in_bfloat16(tmp_path):
    write_pipeline(tmp_path, guidance=True)
    model = diffcore.load_model("flux", pretrained=tmp_path, axes_dim=AXES, frozen_dtype="bfloat16")
    assert model.dtype == torch.float32
    assert {next(m.parameters()).dtype for m in model.frozen.values()} == {torch.bfloat16}
    with torch.no_grad():
        cond = model.encode_conditions({"captions": CAPTIONS})
        out = model.predict(torch.randn(2, LATENT_CHANNELS, 4, 4), torch.tensor([0.5, 0.5]), cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_text_encoders_from_single_files(tmp_path):
    """ComfyUI-style clip_l / t5xxl files (HF keys, no config) encode like the folders they came from."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = write_pipeline(tmp_path / "flux", guidance=True)
    t5 = parts["text_encoder_2"]
    # A file has no config: the loader assumes CLIP-L's conventions (head size 64, quick_gelu,
    # pooling at the highest token id), so this CLIP follows them.
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=60,
            hidden_size=64,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=2,
        )
    ).eval()
    clip.save_pretrained(tmp_path / "flux" / "text_encoder")
    clip_state = {
        "text_model." + k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")
    }
    clip_state["text_projection.weight"] = torch.zeros(4, 4)  # present in some files, not used by Flux
    save_file(clip_state, tmp_path / "clip_l.safetensors")
    save_file(
        {k: v.clone() for k, v in t5.state_dict().items()}, tmp_path / "t5xxl.safetensors"
    )  # both tied keys
    options = dict(axes_dim=AXES, max_sequence_length=MAX_LEN)
    folders = diffcore.load_model("flux", pretrained=tmp_path / "flux", **options)
    files = diffcore.load_model(
        "flux",
        pretrained=tmp_path / "flux" / "transformer",
        text_encoder=str(tmp_path / "clip_l.safetensors"),
        text_encoder_2=str(tmp_path / "t5xxl.safetensors"),
        tokenizer=str(tmp_path / "flux" / "tokenizer"),
        tokenizer_2=str(tmp_path / "flux" / "tokenizer_2"),
        **options,
    )
    with torch.no_grad():
        a = folders.encode_conditions({"captions": CAPTIONS})
        b = files.encode_conditions({"captions": CAPTIONS})
    assert torch.allclose(a["txt"], b["txt"], atol=1e-5)
    assert torch.allclose(a["pooled"], b["pooled"], atol=1e-5)
