"""diffcore's DiT against diffusers' DiTTransformer2DModel: same random weights, same output (fp32),
through the diffusers folder layout and the original facebookresearch/DiT layout."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file

import diffcore
from diffcore.errors import UserError
from diffcore.testing import assert_outputs_close

CONFIGS = {
    # learned sigma, patch 2, diffusers' default norm eps
    "a": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ),
    # no learned sigma, patch 4, three channels, the original DiT's eps
    "b": dict(
        num_attention_heads=3, attention_head_dim=16, in_channels=3, num_layers=3, sample_size=16,
        patch_size=4, num_embeds_ada_norm=5, norm_eps=1e-6,
    ),
}  # fmt: skip


def reference(name: str) -> DiTTransformer2DModel:
    """A diffusers DiT with random (non-zero) weights whose per-block embedders agree, as in every
    checkpoint converted from the original."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**CONFIGS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


def inputs(name: str, batch: int = 3):
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    t = torch.tensor([0.0, 437.5, 999.0][:batch])
    y = torch.tensor([0, cfg["num_embeds_ada_norm"], 1][:batch])  # includes the null class
    return x, t, y


def original_state(model: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """The facebookresearch/DiT layout of diffusers weights, written out independently of convert.py."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
        "pos_embed": model.pos_embed.pos_embed.clone(),
    }
    for i in range(model.config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            out[o + f"attn.qkv.{leaf}"] = torch.cat([sd[d + f"attn1.to_{n}.{leaf}"] for n in "qkv"])
            out[o + f"attn.proj.{leaf}"] = sd[d + f"attn1.to_out.0.{leaf}"]
            out[o + f"mlp.fc1.{leaf}"] = sd[d + f"ff.net.0.proj.{leaf}"]
            out[o + f"mlp.fc2.{leaf}"] = sd[d + f"ff.net.2.{leaf}"]
            out[o + f"adaLN_modulation.1.{leaf}"] = sd[d + f"norm1.linear.{leaf}"]
    return out


def assert_same(ours, theirs, name: str) -> None:
    x, t, y = inputs(name)
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        got = ours.backbone(x, t, y)
    assert_outputs_close(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_folder_matches_diffusers(tmp_path, name):
    ref = reference(name)
    ref.save_pretrained(tmp_path / "transformer")
    ours = diffcore.load_model("dit", pretrained=str(tmp_path))  # a pipeline folder with transformer/
    assert ours.arch.learn_sigma == ("out_channels" in CONFIGS[name])
    assert_same(ours, ref, name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_original_file_matches_diffusers(tmp_path, name):
    ref = reference(name)
    file = tmp_path / "DiT-tiny.safetensors"
    save_file(original_state(ref), str(file))
    cfg = CONFIGS[name]
    ours = diffcore.load_model(
        "dit", pretrained=str(file), num_heads=cfg["num_attention_heads"], norm_eps=cfg.get("norm_eps", 1e-5)
    )
    assert ours.arch.input_size == cfg["sample_size"]
    assert ours.null_label == cfg["num_embeds_ada_norm"]
    assert_same(ours, ref, name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_layouts_round_trip(tmp_path, name):
    ref = reference(name)
    ref.save_pretrained(tmp_path / "ref")
    ours = diffcore.load_model("dit", pretrained=str(tmp_path / "ref"))
    x, t, y = inputs(name)
    with torch.no_grad():
        expected = ours.backbone(x, t, y)

    folder = ours.save_pretrained(tmp_path / "diffusers", layout="diffusers")
    file = ours.save_pretrained(tmp_path / "orig.safetensors", layout="original")
    for path in (folder, file):
        again = diffcore.load_model("dit", pretrained=str(path))  # the original file carries its heads
        assert again.arch == ours.arch
        with torch.no_grad():
            assert torch.equal(again.backbone(x, t, y), expected)

    # diffusers itself reads what diffcore wrote
    theirs = DiTTransformer2DModel.from_pretrained(str(folder)).eval()
    assert_same(ours, theirs, name)
    # and the original layout has exactly the original's keys
    assert set(ours.export_state_dict("original")) == set(original_state(ref))


def test_predict_returns_prediction_channels_and_uses_model_time(tmp_path):
    ref = reference("a")
    ref.save_pretrained(tmp_path)
    eps = diffcore.load_model("dit", pretrained=str(tmp_path))
    flow = diffcore.load_model("dit", pretrained=str(tmp_path), prediction_type="flow")
    x, t, y = inputs("a")
    with torch.no_grad():
        full = ref(x, timestep=t, class_labels=y).sample
        out = eps.predict(x, t, eps.encode_conditions({"labels": y.tolist()}))
        flow_out = flow.predict(x, t / 1000, flow.encode_conditions({"labels": y}))
    assert out.shape == x.shape
    assert_outputs_close(out, full[:, :4], atol=1e-5)
    assert_outputs_close(flow_out, full[:, :4], atol=1e-4)
    assert eps.default_scheduler["type"] == "ddpm" and flow.default_scheduler == {"type": "flow"}


def test_not_a_dit_checkpoint(tmp_path):
    file = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(file))
    with pytest.raises(UserError, match="not a DiT checkpoint"):
        diffcore.load_model("dit", pretrained=str(file))


def test_pickled_checkpoint_is_refused(tmp_path):
    file = tmp_path / "DiT-XL-2-256x256.pt"
    file.write_bytes(b"not read")
    with pytest.raises(UserError, match="only .safetensors"):
        diffcore.load_model("dit", pretrained=str(file))


def test_checkpoint_with_missing_tensors(tmp_path):
    state = original_state(reference("a"))
    del state["blocks.1.mlp.fc2.weight"]
    file = tmp_path / "broken.safetensors"
    save_file(state, str(file))
    with pytest.raises(UserError, match="1 missing .*blocks.1.mlp.fc2.weight"):
        diffcore.load_model("dit", pretrained=str(file), num_heads=2)


def test_per_block_embedders_that_differ_are_refused(tmp_path):
    ref = reference("a")
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    ref.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="block 1's timestep/class embedder differs"):
        diffcore.load_model("dit", pretrained=str(tmp_path))


def test_job_shape_that_contradicts_the_checkpoint(tmp_path):
    reference("a").save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"patch_size=4 but the checkpoint has 2"):
        diffcore.load_model("dit", pretrained=str(tmp_path), patch_size=4)


def test_diffusers_config_is_read(tmp_path):
    reference("b").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    model = diffcore.load_model("dit", pretrained=str(tmp_path))
    assert model.arch.num_heads == config["num_attention_heads"]
    assert model.arch.norm_eps == config["norm_eps"]
    assert model.arch.depth == config["num_layers"]
