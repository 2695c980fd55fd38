"""Tiny SD/SDXL-shaped components for the tests (random weights, a tokenizer made here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffcore_sdxl.config import UNetConfig

# SDXL-shaped: first level without attention, linear projections, deeper last level, text_time embedding
SDXL_UNET = UNetConfig(
    block_out_channels=(32, 64, 128),
    attention=(False, True, True),
    transformer_layers=(1, 1, 2),
    heads=(1, 1, 2),
    cross_attention_dim=64 + 128,
    linear_projection=True,
    addition_time_embed_dim=8,
    addition_input_dim=32 + 6 * 8,
)
# SD1.5-shaped: attention on all but the last level, 8 heads everywhere, 1x1 conv projections
SD15_UNET = UNetConfig(
    block_out_channels=(32, 64, 64),
    attention=(True, True, False),
    transformer_layers=(1, 1, 1),
    heads=(8, 8, 8),
    cross_attention_dim=64,
)

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A tiny CLIP BPE vocabulary: punctuation, digits, letters, a few merges, then BOS and EOS last
    (so EOS has the highest id, as in the real CLIP vocabulary)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in "!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~" + _LETTERS:
        vocab.setdefault(c, len(vocab))
    for c in _LETTERS:
        vocab[c + "</w>"] = len(vocab)
    merges = ["#version: 0.2"]
    for pair in ("th", "he", "an", "in", "at</w>"):
        merges.append(f"{pair[0]} {pair[1:]}")
        vocab[pair] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def tiny_tokenizer(folder: Path, pad_token: str | None = None):
    from transformers import CLIPTokenizer

    vocab, merges = write_tokenizer_files(folder)
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77, **kwargs)


def tiny_clip_config(hidden: int, layers: int, projection: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    # head width 64 as in every released CLIP, so a single file's head count can be inferred
    return CLIPTextConfig(
        vocab_size=len(_LETTERS) * 2 + 32 + 5 + 2 + 11,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=None,
        eos_token_id=2,  # the released configs' legacy value: pool at the highest token id (EOS)
        pad_token_id=1,
    )


def make_sdxl_pipeline(folder: Path, seed: int = 0):
    """Save a tiny SDXL diffusers pipeline (no VAE unless diffusers builds one cheaply) and return it."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET.to_diffusers(sample_size=16))
    te1 = CLIPTextModel(tiny_clip_config(64, 3, 64))
    te2 = CLIPTextModelWithProjection(tiny_clip_config(128, 3, 32, act="gelu"))
    tok1 = tiny_tokenizer(folder / "_tok1")
    tok2 = tiny_tokenizer(folder / "_tok2", pad_token="!")
    unet.save_pretrained(folder / "unet")
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    tok1.save_pretrained(folder / "tokenizer")
    tok2.save_pretrained(folder / "tokenizer_2")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return unet, te1, te2, tok1, tok2


def make_sd15_pipeline(folder: Path, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET.to_diffusers(sample_size=16))
    te1 = CLIPTextModel(tiny_clip_config(64, 3, 64))
    tok1 = tiny_tokenizer(folder / "_tok1")
    unet.save_pretrained(folder / "unet")
    te1.save_pretrained(folder / "text_encoder")
    tok1.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return unet, te1, tok1


@pytest.fixture
def sdxl_folder(tmp_path: Path):
    folder = tmp_path / "sdxl"
    parts = make_sdxl_pipeline(folder)
    return folder, parts
