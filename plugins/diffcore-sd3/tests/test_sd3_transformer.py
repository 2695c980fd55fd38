"""The SD3 transformer against diffusers' SD3Transformer2DModel, through both checkpoint layouts."""

from __future__ import annotations

import re

import pytest
import torch
from _sd3_tiny import LATENT_CHANNELS, POOLED_DIM, SHAPES, T5_DIM, model_options, reference_transformer

import diffcore
from diffcore.errors import UserError
from diffcore.testing import assert_outputs_close
from diffcore.weights import Checkpoint, save_safetensors


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = 2
    return dict(
        x=torch.randn(b, LATENT_CHANNELS, 6, 8, generator=g),
        t=torch.rand(b, generator=g),
        context=torch.randn(b, 5, T5_DIM, generator=g),
        pooled=torch.randn(b, POOLED_DIM, generator=g),
    )


def _reference_out(ref, x, skip_layers=None) -> torch.Tensor:
    with torch.no_grad():
        return ref(
            hidden_states=x["x"],
            encoder_hidden_states=x["context"],
            pooled_projections=x["pooled"],
            timestep=x["t"] * 1000,
            skip_layers=skip_layers,
        ).sample


def _our_out(model, x, skip_layers=()) -> torch.Tensor:
    with torch.no_grad():
        return model.predict(x["x"], x["t"], {"context": x["context"], "pooled": x["pooled"]}, skip_layers=skip_layers)


@pytest.mark.parametrize("name", list(SHAPES))
def test_parity_through_both_layouts(tmp_path, name):
    ref = reference_transformer(name)
    ref.save_pretrained(tmp_path / "diffusers")
    x = _inputs()
    expected = _reference_out(ref, x)
    options = dict(model_options(name), load_encoders=False)

    model = diffcore.load_model(pretrained=tmp_path / "diffusers", **options)
    assert_outputs_close(_our_out(model, x), expected, atol=1e-4)
    # skip-layer guidance's forward: the same blocks passed over
    assert_outputs_close(_our_out(model, x, [1]), _reference_out(ref, x, [1]), atol=1e-4)

    file = model.save_pretrained(tmp_path / "sd3.safetensors", layout="original")
    from_original = diffcore.load_model(pretrained=file, **options)
    assert from_original.backbone.shape == model.backbone.shape
    assert_outputs_close(_our_out(from_original, x), expected, atol=1e-4)

    # Saving in the diffusers layout gives back diffusers' own tensors, key for key.
    folder = from_original.save_pretrained(tmp_path / "resaved", layout="diffusers")
    saved = dict(Checkpoint(folder).items())
    reference = ref.state_dict()
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
    from diffusers import SD3Transformer2DModel

    reloaded = SD3Transformer2DModel.from_pretrained(folder).eval()
    assert_outputs_close(_reference_out(reloaded, x), expected, atol=1e-6)

    # A single file with diffusers key names (under "transformer.") loads as well.
    save_safetensors({"transformer." + k: v for k, v in reference.items()}, tmp_path / "keys.safetensors")
    single = diffcore.load_model(pretrained=tmp_path / "keys.safetensors", **options)
    assert_outputs_close(_our_out(single, x), expected, atol=1e-4)


def test_original_layout_matches_diffusers_converter(tmp_path):
    """diffusers' own single-file converter reads what diffcore writes as the original layout."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    ref = reference_transformer("sd35-medium")
    ref.save_pretrained(tmp_path / "diffusers")
    model = diffcore.load_model(pretrained=tmp_path / "diffusers", type="sd35", variant="medium", load_encoders=False)
    original = model.export_state_dict("original")
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in original
    assert "model.diffusion_model.joint_blocks.2.context_block.attn.proj.weight" not in original  # pre-only
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    reference = ref.state_dict()
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_random_init_position_table_is_the_reference_one():
    ref = reference_transformer("sd35-large")
    model = diffcore.load_model(
        "sd35", hidden_size=24, num_heads=3, depth=1, pooled_dim=POOLED_DIM, context_dim=T5_DIM,
        pos_embed_max_size=8, sample_size=8,
    )  # fmt: skip
    assert torch.allclose(model.backbone.pos_embed, ref.pos_embed.pos_embed, atol=1e-6)


def test_structure_mismatches_are_user_errors(tmp_path):
    reference_transformer("sd35-medium").save_pretrained(tmp_path / "medium")
    reference_transformer("sd35-large").save_pretrained(tmp_path / "large")
    reference_transformer("sd3-medium").save_pretrained(tmp_path / "sd3")
    with pytest.raises(UserError, match=r"SD3\.5 medium \(MMDiT-X.*loaded as large") as info:
        diffcore.load_model("sd35", pretrained=tmp_path / "medium", variant="large", load_encoders=False)
    assert info.value.where == "$.model.variant" and "variant: medium" in str(info.value.hint)
    with pytest.raises(UserError, match="no dual-attention"):
        diffcore.load_model("sd35", pretrained=tmp_path / "large", variant="medium", load_encoders=False)
    with pytest.raises(UserError, match="use type: sd35"):
        diffcore.load_model("sd3", pretrained=tmp_path / "large", load_encoders=False)
    with pytest.raises(UserError, match="use type: sd3"):
        diffcore.load_model("sd35", pretrained=tmp_path / "sd3", load_encoders=False)


def test_gradient_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    model = diffcore.load_model(
        "sd35", variant="medium", hidden_size=16, num_heads=2, depth=2, pooled_dim=POOLED_DIM,
        context_dim=T5_DIM, pos_embed_max_size=8, dual_attention_layers=[0],
    )  # fmt: skip
    x = _inputs()

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        model.backbone.zero_grad()
        model.set_gradient_checkpointing(enabled)
        cond = {"context": x["context"], "pooled": x["pooled"]}
        model.predict(x["x"], x["t"], cond).square().mean().backward()
        return {k: p.grad.clone() for k, p in model.backbone.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_adapter_names_and_contract_facts(tmp_path):
    reference_transformer("sd35-medium").save_pretrained(tmp_path / "t")
    model = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "t", load_encoders=False)
    dim = 16
    assert model.adapter_key("joint_blocks.1.x_block.attn.qkv", "original") == "joint_blocks.1.x_block.attn.qkv"
    assert model.adapter_key("joint_blocks.1.x_block.attn.qkv", "diffusers") == [
        ("transformer_blocks.1.attn.to_q", dim),
        ("transformer_blocks.1.attn.to_k", dim),
        ("transformer_blocks.1.attn.to_v", dim),
    ]
    assert model.adapter_key("joint_blocks.0.context_block.attn.qkv", "diffusers")[1] == (
        "transformer_blocks.0.attn.add_k_proj",
        dim,
    )
    assert model.adapter_key("joint_blocks.0.x_block.attn2.qkv", "diffusers")[0][0] == "transformer_blocks.0.attn2.to_q"
    assert model.adapter_key("joint_blocks.0.context_block.mlp.fc2", "diffusers") == "transformer_blocks.0.ff_context.net.2"
    assert model.adapter_key("joint_blocks.1.context_block.adaLN_modulation.1", "diffusers") == (
        "transformer_blocks.1.norm1_context.linear"
    )
    targets = [n for n, _ in model.backbone.named_modules() if any(re.search(p, n) for p in model.adapter_targets)]
    # 3 blocks: x stream qkv, proj, fc1, fc2, mod (+ attn2 qkv, proj in blocks 0-1); text stream the
    # same but the last block's has only qkv (its modulation is stored swapped in diffusers: no PEFT form)
    assert len(targets) == 3 * 5 + 2 * 2 + 2 * 5 + 1
    assert "joint_blocks.2.context_block.adaLN_modulation.1" not in targets
    assert model.adapter_key("joint_blocks.2.context_block.adaLN_modulation.1", "diffusers") is None
    assert model.adapter_key("final_layer.adaLN_modulation.1", "diffusers") is None
    assert all(isinstance(model.backbone.get_submodule(n), torch.nn.Linear) for n in targets)
    assert model.repeated_blocks() == ["joint_blocks"]
    assert isinstance(model.backbone.get_submodule("joint_blocks"), torch.nn.ModuleList)
    assert model.sequence_length(torch.zeros(1, LATENT_CHANNELS, 64, 96)) == 32 * 48
    small, large = (model.flops_per_sample(torch.zeros(1, LATENT_CHANNELS, s, s)) for s in (4, 8))
    assert small is not None and large is not None and large > small > 0
    assert model.default_scheduler == {"type": "flow", "shift": 3.0}
    assert model.prediction_type == "flow" and model.latent_channels == LATENT_CHANNELS


def test_load_exported_inverts_the_training_export(tmp_path):
    reference_transformer("sd35-medium", seed=3).save_pretrained(tmp_path / "a")
    reference_transformer("sd35-medium", seed=4).save_pretrained(tmp_path / "b")
    trained = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "a", load_encoders=False)
    fresh = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "b", load_encoders=False)
    fresh.load_exported(trained.export_state_dict("diffusers"))
    for key, value in trained.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[key], value), key


def test_fused_functions_have_the_composed_gradients():
    from diffcore_sd3.fused import modulated_layer_norm, modulated_layer_norms, rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: modulated_layer_norm(a, b, c, 1e-6), (x, shift, scale))
    expected = torch.nn.functional.layer_norm(x, (6,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert torch.allclose(modulated_layer_norm(x, shift, scale), expected)
    # two modulations of one norm (MMDiT-X): both outputs and the summed gradient
    shift2 = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale2 = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e: modulated_layer_norms(a, (b, c), (d, e), 1e-6), (x, shift, scale, shift2, scale2)
    )
    # q/k norms work on strided views of a fused projection
    qkv = torch.randn(2, 3, 4, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a.permute(2, 0, 3, 1, 4)[0], w, 1e-6), (qkv, weight))
    q = qkv.permute(2, 0, 3, 1, 4)[0]
    reference = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    assert torch.allclose(rms_norm(q, weight, 1e-6), reference)
