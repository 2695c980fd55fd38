"""Tiny random backbones in the diffusers layout (diffusers and transformers as references only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffcore.testing.tokenizers import t5_tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"

#: SD1.5-shaped (conv projections, attention on the first level) and SDXL-shaped (linear
#: projections, size conditioning) UNets, two levels each
SD15_UNET: dict[str, Any] = dict(
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
    sample_size=8,
)
SDXL_UNET: dict[str, Any] = dict(
    SD15_UNET,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=16 + 6 * 4,
)
FLUX_TRANSFORMER: dict[str, Any] = dict(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Every parameter drawn afresh (zero projections included), so every path moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tokenizer(folder: Path):
    """A tiny CLIP BPE tokenizer: letters, a few merges, BOS and EOS last."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in "!,." + LETTERS:
        vocab.setdefault(c, len(vocab))
    for c in LETTERS:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def unet_folder(
    root: Path, shape: dict[str, Any], seed: int = 0, *, text: bool = False, std: float | None = 0.05
) -> dict[str, Any]:
    """A diffusers pipeline folder with a random UNet (every weight drawn with ``std``, or diffusers'
    own init for None) and optionally a CLIP text encoder with its tokenizer."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**shape).eval()
    if std is not None:
        randomize(unet, seed, std)
    unet.save_pretrained(root / "unet")
    parts: dict[str, Any] = {"unet": unet}
    if text:
        parts["text_encoder"] = text_encoder(seed + 1)
        parts["tokenizer"] = tokenizer(root / "_tok")
        parts["text_encoder"].save_pretrained(root / "text_encoder")
        parts["tokenizer"].save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return parts


def flux_folder(root: Path, seed: int = 0):
    """A diffusers FluxTransformer2DModel folder with random weights, and the reference model."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = randomize(FluxTransformer2DModel(**FLUX_TRANSFORMER), seed, 0.1).eval()
    transformer.save_pretrained(root)
    return transformer


def flux_pipeline(root: Path, seed: int = 0) -> None:
    """A diffusers Flux.1 dev pipeline folder without a VAE: transformer, CLIP and T5 with tokenizers."""
    from transformers import T5Config, T5EncoderModel

    flux_folder(root / "transformer", seed)
    text_encoder(seed + 1).save_pretrained(root / "text_encoder")
    tokenizer(root / "_tok").save_pretrained(root / "tokenizer")
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, decoder_start_token_id=0)
    )
    t5.save_pretrained(root / "text_encoder_2")
    t5_tokenizer(words=()).save_pretrained(root / "tokenizer_2")
