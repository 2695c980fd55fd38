"""The Flux transformer against diffusers' FluxTransformer2DModel, through both checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
from _flux_tiny import AXES, LATENT_CHANNELS, SIZES, TEXT_DIM, reference_transformer
from diffcore_flux.packing import image_ids, pack, text_ids, unpack

import diffcore
from diffcore.errors import UserError
from diffcore.testing import assert_outputs_close
from diffcore.weights import Checkpoint

VARIANTS = [("dev", True), ("schnell", False)]


def _inputs(guidance: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w, length, b = 6, 8, 5, 2
    latents = torch.randn(b, LATENT_CHANNELS, h, w, generator=g)
    return dict(
        img=pack(latents),
        img_ids=image_ids(h, w),
        txt=torch.randn(b, length, TEXT_DIM, generator=g),
        txt_ids=text_ids(length),
        t=torch.rand(b, generator=g),
        y=torch.randn(b, TEXT_DIM, generator=g),
        guidance=torch.full((b,), 3.5) if guidance else None,
    )


def _reference_out(ref, x) -> torch.Tensor:
    with torch.no_grad():
        return ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["t"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
        ).sample


def _our_out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.backbone(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])


@pytest.mark.parametrize(("variant", "guidance"), VARIANTS)
def test_parity_through_both_layouts(tmp_path, variant, guidance):
    ref = reference_transformer(guidance)
    ref.save_pretrained(tmp_path / "diffusers")
    x = _inputs(guidance)
    expected = _reference_out(ref, x)

    model = diffcore.load_model("flux", pretrained=tmp_path / "diffusers", variant=variant, axes_dim=AXES)
    assert_outputs_close(_our_out(model, x), expected, atol=1e-4)

    file = model.save_pretrained(tmp_path / "bfl.safetensors", layout="original")
    from_original = diffcore.load_model("flux", pretrained=file, variant=variant, axes_dim=AXES)
    assert from_original.backbone.shape == model.backbone.shape
    assert_outputs_close(_our_out(from_original, x), expected, atol=1e-4)

    # Saving in the diffusers layout gives back diffusers' own tensors, key for key.
    folder = from_original.save_pretrained(tmp_path / "resaved", layout="diffusers")
    saved = dict(Checkpoint(folder).items())
    reference = ref.state_dict()
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
    from diffusers import FluxTransformer2DModel

    reloaded = FluxTransformer2DModel.from_pretrained(folder).eval()
    assert_outputs_close(_reference_out(reloaded, x), expected, atol=1e-6)

    # A single file with diffusers key names (bare or under "transformer.") loads as well.
    prefixed = {"transformer." + k: v for k, v in reference.items()}
    diffcore.weights.save_safetensors(prefixed, tmp_path / "diffusers_keys.safetensors")
    single = diffcore.load_model(
        "flux", pretrained=tmp_path / "diffusers_keys.safetensors", variant=variant, axes_dim=AXES
    )
    assert_outputs_close(_our_out(single, x), expected, atol=1e-4)


def test_original_layout_uses_bfl_names(tmp_path):
    model = diffcore.load_model("flux", **{**SIZES, "depth": 1, "depth_single": 1})
    keys = set(model.export_state_dict("original"))
    expected_subset = {
        "img_in.weight",
        "txt_in.bias",
        "time_in.in_layer.weight",
        "vector_in.out_layer.bias",
        "guidance_in.in_layer.weight",
        "double_blocks.0.img_mod.lin.weight",
        "double_blocks.0.txt_attn.qkv.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.0.txt_attn.norm.key_norm.scale",
        "double_blocks.0.img_attn.proj.bias",
        "double_blocks.0.txt_mlp.0.weight",
        "double_blocks.0.img_mlp.2.weight",
        "single_blocks.0.linear1.weight",
        "single_blocks.0.linear2.bias",
        "single_blocks.0.modulation.lin.weight",
        "single_blocks.0.norm.query_norm.scale",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    }
    assert expected_subset <= keys
    assert not any(k.endswith("_norm.weight") for k in keys)
    # A ComfyUI-style prefixed file with foreign (VAE) keys loads too.
    tensors = {"model.diffusion_model." + k: v for k, v in model.export_state_dict("original").items()}
    tensors["vae.decoder.conv_in.weight"] = torch.zeros(1)
    diffcore.weights.save_safetensors(tensors, tmp_path / "comfy.safetensors")
    again = diffcore.load_model("flux", pretrained=tmp_path / "comfy.safetensors", axes_dim=AXES)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[k], v)
    # A lone transformer file converts and exports, but cannot encode captions or pixels.
    with pytest.raises(UserError, match="no text encoders loaded.*text_encoder_2"):
        again.encode_conditions({"captions": ["a cat"]})
    with pytest.raises(UserError, match="no autoencoder loaded"):
        again.encode_images(torch.zeros(1, 3, 16, 16))


def test_variant_mismatch_is_a_user_error(tmp_path):
    reference_transformer(guidance=False).save_pretrained(tmp_path / "schnell")
    with pytest.raises(UserError, match="no guidance embedding.*variant: schnell"):
        diffcore.load_model("flux", pretrained=tmp_path / "schnell", variant="dev", axes_dim=AXES)
    with pytest.raises(UserError, match="not a Flux checkpoint"):
        diffcore.load_model("flux", pretrained=tmp_path)


def test_packing_and_ids_match_diffusers():
    from diffusers import FluxPipeline

    latents = torch.randn(2, LATENT_CHANNELS, 6, 8)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, LATENT_CHANNELS, 6, 8))
    assert torch.equal(unpack(packed, 6, 8), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 8), ids)


def test_gradient_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    model = diffcore.load_model("flux", **SIZES)
    x = _inputs(True)

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        model.backbone.zero_grad()
        model.set_gradient_checkpointing(enabled)
        model.backbone(
            x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"]
        ).square().mean().backward()
        return {k: p.grad.clone() for k, p in model.backbone.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_adapter_names():
    model = diffcore.load_model("flux", **SIZES)
    dim, mlp = SIZES["hidden_size"], 4 * SIZES["hidden_size"]
    assert (
        model.adapter_key("double_blocks.1.img_attn.qkv", "original") == "double_blocks.1.img_attn.qkv"
    )
    assert model.adapter_key("double_blocks.1.img_attn.qkv", "diffusers") == [
        ("transformer_blocks.1.attn.to_q", dim),
        ("transformer_blocks.1.attn.to_k", dim),
        ("transformer_blocks.1.attn.to_v", dim),
    ]
    assert model.adapter_key("double_blocks.0.txt_attn.qkv", "diffusers")[2] == (
        "transformer_blocks.0.attn.add_v_proj",
        dim,
    )
    assert model.adapter_key("single_blocks.1.linear1", "diffusers") == [
        ("single_transformer_blocks.1.attn.to_q", dim),
        ("single_transformer_blocks.1.attn.to_k", dim),
        ("single_transformer_blocks.1.attn.to_v", dim),
        ("single_transformer_blocks.1.proj_mlp", mlp),
    ]
    assert model.adapter_key("single_blocks.0.linear2", "diffusers") == "single_transformer_blocks.0.proj_out"
    assert model.adapter_key("double_blocks.0.img_mlp.2", "diffusers") == "transformer_blocks.0.ff.net.2"
    assert (
        model.adapter_key("double_blocks.0.txt_mod.lin", "diffusers")
        == "transformer_blocks.0.norm1_context.linear"
    )
    import re

    targets = [
        name
        for name, m in model.backbone.named_modules()
        if any(re.search(p, name) for p in model.adapter_targets)
    ]
    # per double block: 2 qkv, 2 proj, 4 mlp, 2 mod; per single block: linear1, linear2, modulation
    assert len(targets) == 2 * 10 + 2 * 3
    assert all(isinstance(model.backbone.get_submodule(n), torch.nn.Linear) for n in targets)


def test_load_exported_inverts_the_training_export():
    torch.manual_seed(0)
    trained = diffcore.load_model("flux", **SIZES)
    for p in trained.backbone.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fresh = diffcore.load_model("flux", **SIZES)
    fresh.load_exported(trained.export_state_dict("diffusers"))
    for key, value in trained.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[key], value), key


def test_without_encoders_nothing_frozen_is_built():
    model = diffcore.load_model("flux", load_encoders=False, vae_options={"block_out_channels": [8]}, **SIZES)
    assert model.autoencoder is None and not model.frozen
