"""Tiny random SD3 components shared by the tests (diffusers and transformers as references only)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffcore.testing.tokenizers import clip_tokenizer, t5_tokenizer

LATENT_CHANNELS = 16
# 64-wide heads, as every released CLIP text tower: a single file stores no config, so the loader
# reads the head count from the width
CLIP_L_DIM, CLIP_G_DIM = 64, 64
POOLED_DIM = CLIP_L_DIM + CLIP_G_DIM
T5_DIM = 136  # the context width: wider than both CLIPs side by side, as 4096 is

#: the three shapes the issue names, shrunk: (sd35 variant or None for sd3, diffusers config)
SHAPES = {
    "sd3-medium": (
        None,
        dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, qk_norm=None, pos_embed_max_size=8),
    ),
    "sd35-large": (
        "large",
        dict(num_layers=3, attention_head_dim=8, num_attention_heads=3, qk_norm="rms_norm", pos_embed_max_size=8),
    ),
    "sd35-medium": (
        "medium",
        dict(
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=2,
            qk_norm="rms_norm",
            pos_embed_max_size=12,
            dual_attention_layers=(0, 1),
        ),
    ),
}


def model_options(name: str) -> dict:
    """``diffcore.load_model`` type and variant for one of SHAPES."""
    variant = SHAPES[name][0]
    return {"type": "sd3"} if variant is None else {"type": "sd35", "variant": variant}


def reference_transformer(name: str, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    config = dict(SHAPES[name][1])
    dim = config["attention_head_dim"] * config["num_attention_heads"]
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=dim,
        pooled_projection_dim=POOLED_DIM,
        **config,
    ).eval()
    with torch.no_grad():  # larger than default init so every path moves the output
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _clip(hidden: int, act: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=70,
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=hidden,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    ).eval()


def text_encoders(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    clip_l = _clip(CLIP_L_DIM, "quick_gelu", seed)
    clip_g = _clip(CLIP_G_DIM, "gelu", seed + 1)
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=70,
            d_model=T5_DIM,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    ).eval()
    return clip_l, clip_g, t5


def write_vae(folder: Path, seed: int = 0) -> None:
    """A tiny SD3-style (16 channels, no quant convs) diffusers autoencoder folder, 2x downscale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ).save_pretrained(folder)


def write_pipeline(
    root: Path, name: str = "sd35-medium", seed: int = 0, t5: bool = True, vae: bool = False
) -> dict:
    """A diffusers-layout SD3 folder (VAE only when asked) and the reference components it was written from."""
    transformer = reference_transformer(name, seed)
    clip_l, clip_g, t5_model = text_encoders(seed + 1)
    tok, tok2, tok3 = clip_tokenizer(punctuation="!"), clip_tokenizer("!", punctuation="!"), t5_tokenizer()
    transformer.save_pretrained(root / "transformer")
    clip_l.save_pretrained(root / "text_encoder")
    clip_g.save_pretrained(root / "text_encoder_2")
    tok.save_pretrained(root / "tokenizer")
    tok2.save_pretrained(root / "tokenizer_2")
    parts = dict(
        transformer=transformer,
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        tokenizer=tok,
        tokenizer_2=tok2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if vae:
        write_vae(root / "vae", seed)
    if t5:
        t5_model.save_pretrained(root / "text_encoder_3")
        tok3.save_pretrained(root / "tokenizer_3")
        parts.update(text_encoder_3=t5_model, tokenizer_3=tok3)
    return parts
