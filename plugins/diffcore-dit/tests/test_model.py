"""The dit model object: configuration, the model protocol, training knobs and latent space."""

from __future__ import annotations

import re

import pytest
import torch
from diffcore_dit.config import DiTConfig, arch_from_config

import diffcore
from diffcore.errors import ConfigError, UserError
from diffcore.testing import assert_entry_points_light

TINY = dict(hidden_size=32, depth=2, num_heads=2, patch_size=4, in_channels=3, input_size=16, num_classes=4)


def test_plugin_entry_point_does_not_import_torch():
    assert assert_entry_points_light("diffcore-dit") == ["diffcore_dit.plugin"]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("S/2", (384, 12, 6, 2)),
        ("B/4", (768, 12, 12, 4)),
        ("L/8", (1024, 24, 16, 8)),
        ("XL/2", (1152, 28, 16, 2)),
    ],
)
def test_size_presets(size, expected):
    arch = arch_from_config(DiTConfig(size=size, input_size=32))
    assert (arch.hidden_size, arch.depth, arch.num_heads, arch.patch_size) == expected
    assert arch.mlp_hidden == 4 * arch.hidden_size


def test_free_fields_override_the_preset():
    arch = arch_from_config(DiTConfig(size="S/2", depth=3, mlp_ratio=2.0))
    assert (arch.hidden_size, arch.depth, arch.mlp_hidden) == (384, 3, 768)


def test_shape_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown DiT size 'M/2'"):
        arch_from_config(DiTConfig(size="M/2"))
    with pytest.raises(UserError, match="missing num_heads"):
        arch_from_config(DiTConfig(hidden_size=64, depth=2, patch_size=2))
    with pytest.raises(UserError, match="not divisible by patch_size 8"):
        arch_from_config(DiTConfig(size="S/8", input_size=12))
    with pytest.raises(ConfigError, match="prediction_type"):
        diffcore.load_model("dit", prediction_type="x1", **TINY)


def test_single_file_shapes_the_job_must_complete_name_their_options(tmp_path):
    from safetensors.torch import save_file

    model = diffcore.load_model("dit", **TINY)
    tensors = {k: v.contiguous() for k, v in model.export_state_dict("original").items()}
    save_file(tensors, str(tmp_path / "dit.safetensors"))  # no diffcore metadata: heads are the job's
    with pytest.raises(UserError) as caught:
        diffcore.load_model("dit", pretrained=str(tmp_path / "dit.safetensors"), num_heads=3)
    assert caught.value.where == "$.model.num_heads" and "32 wide" in caught.value.message
    no_grid = {k: v for k, v in tensors.items() if k != "pos_embed"}
    save_file(no_grid, str(tmp_path / "no_grid.safetensors"))  # nor its input size
    with pytest.raises(UserError) as caught:
        diffcore.load_model("dit", pretrained=str(tmp_path / "no_grid.safetensors"), num_heads=2, input_size=18)
    assert caught.value.where == "$.model.input_size" and "patch size 4" in caught.value.message
    loaded = diffcore.load_model("dit", pretrained=str(tmp_path / "no_grid.safetensors"), num_heads=2, input_size=16)
    assert loaded.backbone.arch.num_heads == 2


def test_random_model_starts_at_zero_output_and_has_the_null_class():
    model = diffcore.load_model("dit", **TINY)
    assert model.null_label == 4 and model.latent_channels == 3 and model.latent_downscale == 1
    x = torch.randn(2, 3, 16, 16)
    labels = model.encode_conditions(model.null_batch({"labels": torch.tensor([0, 3])}))
    assert labels.tolist() == [4, 4]
    # adaLN-Zero: the output layer starts at zero
    assert torch.count_nonzero(model.predict(x, torch.tensor([10.0, 900.0]), labels)) == 0


def test_labels_are_checked():
    model = diffcore.load_model("dit", **TINY)
    with pytest.raises(UserError, match="no labels"):
        model.encode_conditions({"captions": ["a red circle"]})
    with pytest.raises(UserError, match=r"labels must lie in \[0, 4\]"):
        model.encode_conditions({"labels": [0, 7]})


def test_trains_and_other_resolutions_and_checkpointing_agree():
    torch.manual_seed(0)
    model = diffcore.load_model("dit", learn_sigma=True, **TINY)
    with torch.no_grad():  # leave the adaLN-Zero start so gradients reach every layer
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    assert model.predict(x, t, y).shape == (2, 3, 16, 16)  # the sigma half is dropped
    assert model.backbone(x, t, y).shape == (2, 6, 16, 16)
    assert model.predict(torch.randn(1, 3, 24, 32), t[:1], y[:1]).shape == (1, 3, 24, 32)

    model.backbone.train()
    plain = model.predict(x, t, y)
    plain.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.backbone.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    model.backbone.zero_grad()
    model.set_gradient_checkpointing(True)
    again = model.predict(x, t, y)
    again.square().mean().backward()
    assert torch.equal(again, plain)
    for n, p in model.backbone.named_parameters():
        torch.testing.assert_close(p.grad, grads[n])


def test_adapter_targets_and_names():
    model = diffcore.load_model("dit", **TINY)
    names = [n for n, _ in model.backbone.named_modules()]
    targeted = sorted(n for n in names if any(re.search(p, n) for p in model.adapter_targets))
    assert targeted == sorted(
        f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert model.adapter_key("blocks.1.attn.proj", "original") == "blocks.1.attn.proj"
    assert model.adapter_key("blocks.1.mlp.fc1", "diffusers") == "transformer_blocks.1.ff.net.0.proj"
    # fused here, three modules in diffusers: PEFT files hold one part per module, hidden_size rows each
    hidden = model.arch.hidden_size
    assert model.adapter_key("blocks.0.attn.qkv", "diffusers") == [
        (f"transformer_blocks.0.attn1.to_{x}", hidden) for x in "qkv"
    ]


def test_bfloat16_and_export_layouts():
    model = diffcore.load_model("dit", dtype="bfloat16", **TINY)
    assert model.dtype == torch.bfloat16
    out = model.predict(torch.randn(1, 3, 16, 16), torch.tensor([5.0]), torch.tensor([0]))
    assert out.dtype == torch.bfloat16
    diffusers = model.export_state_dict("diffusers")
    assert "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight" in diffusers
    assert diffusers["transformer_blocks.0.attn1.to_q.weight"].shape == (32, 32)
    assert model.export_state_dict("original")["pos_embed"].shape == (1, 16, 32)
    with pytest.raises(UserError, match="unknown checkpoint layout"):
        model.export_state_dict("comfy")


def test_latent_space_through_the_vae_plugin():
    pytest.importorskip("diffcore_vae")
    small_vae = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
    model = diffcore.load_model(
        "dit", autoencoder="sd", autoencoder_options=small_vae, hidden_size=32, depth=1, num_heads=2,
        patch_size=2, input_size=8, num_classes=2,
    )  # fmt: skip
    assert model.arch.in_channels == 4 and model.latent_downscale == 2
    latents = model.encode_images(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert latents.shape == (1, 4, 8, 8)
    assert model.predict(latents, torch.tensor([1.0]), torch.tensor([1])).shape == latents.shape
    assert model.decode_latents(latents).shape == (1, 3, 16, 16)
    with pytest.raises(UserError, match="makes 4"):
        diffcore.load_model("dit", autoencoder="sd", autoencoder_options=small_vae, in_channels=3, **{
            k: v for k, v in TINY.items() if k != "in_channels"
        })  # fmt: skip


def test_load_exported_inverts_the_training_export():
    torch.manual_seed(0)
    trained = diffcore.load_model("dit", **TINY)
    for p in trained.backbone.parameters():  # adaLN-Zero starts at zero: move every weight
        torch.nn.init.normal_(p, std=0.05)
    fresh = diffcore.load_model("dit", **TINY)
    fresh.load_exported(trained.export_state_dict("diffusers"))
    x, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 900.0]), torch.tensor([0, 3])
    assert torch.equal(fresh.predict(x, t, labels), trained.predict(x, t, labels))


def test_without_encoders_a_latent_dit_skips_its_autoencoder():
    options = {**TINY, "in_channels": 4}
    model = diffcore.load_model("dit", autoencoder="sd", load_encoders=False, **options)
    assert model.autoencoder is None and model.latent_channels == 4


def test_flops_per_sample_matches_a_hand_count_and_torch_flop_counter():
    """TINY at 16x16: patch 4 gives 16 tokens of width 32 (2 heads), MLP 128, 2 blocks."""
    model = diffcore.load_model("dit", **TINY)
    tokens, d, mlp = 16, 32, 128
    patch_embed = 2 * (3 * 4 * 4) * d * tokens  # a 4x4 stride-4 conv from 3 channels: 49152
    t_mlp = 2 * 256 * d + 2 * d * d  # the sinusoid's MLP, once per sample: 18432
    per_token = 2 * d * 3 * d + 2 * d * d + 2 * d * mlp + 2 * mlp * d  # qkv, proj, fc1, fc2: 24576
    attention = 2 * tokens * tokens * d + 2 * tokens * tokens * d  # q k^T and weights @ v: 32768
    ada_ln = 2 * d * 6 * d  # six modulations per sample: 12288
    block = per_token * tokens + attention + ada_ln  # 438272
    final = 2 * d * (4 * 4 * 3) * tokens + 2 * d * 2 * d  # to 4x4 patches of 3 channels, its adaLN: 53248
    hand = patch_embed + t_mlp + 2 * block + final
    assert hand == 997_376
    latents = torch.zeros(1, 3, 16, 16)
    assert model.flops_per_sample(latents) == hand
    assert model.sequence_length(latents) == tokens

    # torch's own count of the same forward (the math attention backend runs as counted matmuls)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model.predict(torch.randn(1, 3, 16, 16), torch.tensor([10.0]), torch.tensor([1]))
    assert counter.get_total_flops() == hand
    # a non-square latent: the count follows the token grid (2 x 4 patches), not the native 4 x 4
    assert model.flops_per_sample(torch.zeros(1, 3, 8, 16)) < hand
