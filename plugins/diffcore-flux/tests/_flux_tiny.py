"""Tiny random Flux components shared by the tests (diffusers and transformers as references only)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffcore.testing.tokenizers import clip_tokenizer, t5_tokenizer

LATENT_CHANNELS = 4
TEXT_DIM = 32  # T5 d_model and CLIP hidden size
AXES = [4, 6, 6]
SIZES = dict(
    hidden_size=32,
    num_heads=2,
    depth=2,
    depth_single=2,
    axes_dim=AXES,
    in_channels=LATENT_CHANNELS * 4,
    vec_in_dim=TEXT_DIM,
    context_in_dim=TEXT_DIM,
)


def reference_transformer(guidance: bool, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        in_channels=LATENT_CHANNELS * 4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance,
        axes_dims_rope=tuple(AXES),
    ).eval()
    with torch.no_grad():  # larger than default init so every path moves the output
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def text_encoders(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=60,
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=60,
            d_model=TEXT_DIM,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    ).eval()
    return clip, t5


def write_pipeline(root: Path, guidance: bool, seed: int = 0) -> dict:
    """A diffusers-layout Flux folder (no VAE) and the reference components it was written from."""
    transformer = reference_transformer(guidance, seed)
    clip, t5 = text_encoders(seed + 1)
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    transformer.save_pretrained(root / "transformer")
    clip.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder_2")
    tok.save_pretrained(root / "tokenizer")
    tok2.save_pretrained(root / "tokenizer_2")
    return dict(
        transformer=transformer, text_encoder=clip, text_encoder_2=t5, tokenizer=tok, tokenizer_2=tok2
    )
