"""Tiny SD1.5- and SDXL-shaped diffusers pipelines written to a folder (random weights, a CLIP BPE
tokenizer made here), for loading into diffcore and into diffusers alike: the fixture method plugins
(DreamBooth, textual inversion) test against. Needs diffusers and transformers (test-only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tokenizer(folder: Path, pad_token: str | None = None):
    """Punctuation, digits, letters, a few merges, then BOS and EOS (EOS the highest id, as in CLIP);
    the text encoders' tables have exactly as many rows as this vocabulary."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in "!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~" + _LETTERS:
        vocab.setdefault(c, len(vocab))
    for c in _LETTERS:
        vocab[c + "</w>"] = len(vocab)
    merges = ["#version: 0.2"]
    for left, right in (("c", "a"), ("ca", "t</w>"), ("p", "h"), ("o", "t")):
        merges.append(f"{left} {right}")
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **kwargs)


def clip(hidden: int, vocab: int, projection: bool, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=hidden // 64, max_position_embeddings=77, projection_dim=32, hidden_act=act,
        bos_token_id=None, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def unet(cross: int, sdxl: bool):
    from diffusers import UNet2DConditionModel

    options = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=2, norm_num_groups=8,
    )  # fmt: skip
    if sdxl:
        options.update(
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
            use_linear_projection=True,
        )  # fmt: skip
    return UNet2DConditionModel(**options)


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1, norm_num_groups=4, latent_channels=4,
    )  # fmt: skip


def write_pipeline(folder: Path, family: str, with_vae: bool = False, seed: int = 0) -> dict:
    """A tiny ``family`` ("sd15" or "sdxl") pipeline folder; returns its parts by component name."""
    torch.manual_seed(seed)
    sdxl = family == "sdxl"
    parts: dict = {"tokenizer": tokenizer(folder / "_tok1")}
    vocab = len(parts["tokenizer"])
    parts["text_encoder"] = clip(64, vocab, projection=False)
    if sdxl:
        parts["tokenizer_2"] = tokenizer(folder / "_tok2", pad_token="!")
        parts["text_encoder_2"] = clip(128, vocab, projection=True, act="gelu")
    parts["unet"] = unet(64 + 128 if sdxl else 64, sdxl)
    if with_vae:
        parts["vae"] = vae()
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return parts
