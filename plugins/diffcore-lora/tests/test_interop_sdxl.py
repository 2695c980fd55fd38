"""A LoRA trained by diffcore on a tiny SDXL-shaped model, saved in the kohya format, loads
through diffusers' ``load_lora_weights`` with every key consumed and gives diffcore's output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffcore_lora.adapter import NetworkAdapter
from diffcore_lora.config import LoraConfig
from lora_tiny import lora_layers as _lora_layers
from lora_tiny import randomize
from lora_tiny import unused_key_warning as _unused
from lora_tiny import watch_diffusers as _watch_diffusers

import diffcore

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


# -- SDXL ------------------------------------------------------------------------------------------
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate("!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~" + LETTERS)}
    for c in LETTERS:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")


def _clip(hidden: int, projection: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=hidden // 64,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="gelu" if with_projection else "quick_gelu",
        eos_token_id=2,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _sdxl_folder(folder: Path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[32, 64, 128],
        layers_per_block=2,
        attention_head_dim=[1, 1, 2],
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=192,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    te1, te2 = _clip(64, 64, False), _clip(128, 32, True)
    unet.save_pretrained(folder / "unet")
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    _clip_tokenizer(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    _clip_tokenizer(folder / "tokenizer_2").save_pretrained(folder / "tokenizer_2")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))


@pytest.mark.parametrize(
    "kind,fmt",
    [
        ("lora", "kohya"),
        pytest.param("lora", "peft", marks=pytest.mark.slow),
        pytest.param("dora", "peft", marks=pytest.mark.slow),
    ],
)
def test_sdxl_lora_loads_in_diffusers(tmp_path, kind, fmt):
    pytest.importorskip("diffcore_sdxl")
    folder = tmp_path / "sdxl"
    _sdxl_folder(folder)
    model = diffcore.load_model("sdxl", pretrained=str(folder), autoencoder=False)
    # diffusers drops kohya dora_scale for SDXL, and leaves a PEFT DoRA's text-encoder magnitudes
    # unloaded: DoRA is checked on the UNet in the PEFT layout (ComfyUI reads kohya dora_scale)
    adapter = NetworkAdapter(LoraConfig(rank=4, alpha=2.0, text_encoders=kind == "lora"), kind=kind)
    params = adapter.attach(model)
    magnitudes = [b.magnitude.detach().clone() for b in adapter.branches.values() if kind == "dora"]
    randomize(params, std=0.1)
    with torch.no_grad():  # a trained magnitude stays near the row norm
        for branch, m in zip([b for b in adapter.branches.values() if kind == "dora"], magnitudes):
            branch.magnitude.copy_(m * (1 + torch.rand_like(m) * 0.2))
    path = tmp_path / "sdxl_lora.safetensors"
    adapter.save(path, fmt=fmt)
    keys = diffcore.weights.Checkpoint(path).keys()
    if fmt == "kohya":
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    else:
        assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
        # PEFT names are module paths: transformers 5's CLIPTextModel has no text_model level
        if kind == "lora":
            assert any(
                k.startswith("text_encoder.") and "layers.0.self_attn.q_proj.lora_A" in k for k in keys
            )
            assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in keys)
        else:
            assert (
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"
                in keys
            )

    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None,
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"),
        text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer=None,
        tokenizer_2=None,
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=diffusers.EulerDiscreteScheduler(),
    )
    watch = _watch_diffusers()
    try:
        pipe.load_lora_weights(str(path))
    finally:
        logging.getLogger("diffusers").removeHandler(watch)
    assert not [m for m in watch.messages if _unused(m)], watch.messages
    by_component = {}
    for t in adapter.targets:
        by_component[t.component] = by_component.get(t.component, 0) + 1
    assert _lora_layers(pipe.unet) == by_component["backbone"]
    assert _lora_layers(pipe.text_encoder) == by_component.get("te1", 0)
    assert _lora_layers(pipe.text_encoder_2) == by_component.get("te2", 0)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 725.0])
    ctx = torch.randn(2, 11, 192, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0]] * 2)
    with torch.no_grad():
        want = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = model.backbone(x, t, ctx, pooled=pooled, time_ids=time_ids)
        plain = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")(
            x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the output
    assert (got - want).abs().max() < 1e-4
    ids = torch.tensor([[49, 5, 6, 7, 50, 1, 1]])
    with torch.no_grad():
        for name, ref in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
            ours = model.frozen[name](ids, output_hidden_states=True).hidden_states[-2]
            theirs = ref(ids, output_hidden_states=True).hidden_states[-2]
            assert (ours - theirs).abs().max() < 1e-4
