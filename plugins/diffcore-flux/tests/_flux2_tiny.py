"""Tiny random Flux.2 components shared by the Flux.2 tests (diffusers and transformers as references only)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffcore.testing.tokenizers import llm_tokenizer

LATENT_CHANNELS = 16  # a tiny Flux.2 autoencoder: 4 channels patchified 2x2
TEXT_HIDDEN = 32
LAYERS = (1, 2, 3)  # stacked hidden states of a 4-layer LLM
TEXT_DIM = TEXT_HIDDEN * len(LAYERS)
AXES = (4, 4, 4, 4)
MAX_LEN = 12
SHAPE = dict(
    hidden_size=32, num_heads=2, depth=2, depth_single=2, axes_dim=list(AXES), in_channels=LATENT_CHANNELS,
    context_in_dim=TEXT_DIM,
)  # fmt: skip
VAE = dict(block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=4)
WORDS = "a the cat dog sat on mat by red blue".split()


def variant(dev: bool) -> str:
    return "dev" if dev else "klein-4b"


def reference_transformer(dev: bool, seed: int = 0, in_channels: int = LATENT_CHANNELS, out_channels=None):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=AXES,
        guidance_embeds=dev,
    ).eval()  # fmt: skip
    _randomize(model, seed)
    return model


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger than the default init so every path moves the output
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def text_encoder(dev: bool, seed: int = 5, hidden: int = TEXT_HIDDEN):
    """Tiny Mistral-3 (dev, with its vision tower as published) or Qwen3 (klein)."""
    common = dict(
        vocab_size=24, hidden_size=hidden, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    if not dev:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(**common, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
        return _randomize(Qwen3ForCausalLM(config), seed)
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    text = MistralConfig(**common, rope_theta=1e9, rms_norm_eps=1e-5, sliding_window=None)
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
        image_size=32, patch_size=16,
    )  # fmt: skip
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=23)
    return _randomize(Mistral3ForConditionalGeneration(config), seed)


def reference_vae(seed: int = 3):
    """A tiny AutoencoderKLFlux2 (downscale 2, patchified 2x2: 16 channels at 1/4 size), random
    batch-norm statistics included."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, **VAE
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 1 / p[0].numel() ** 0.5))
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae.eval()


def write_pipeline(root: Path, dev: bool, seed: int = 0, vae: bool = False, **transformer) -> dict:
    """A diffusers-layout Flux.2 folder (the VAE only when asked) and the reference components it was
    written from."""
    parts = dict(
        transformer=reference_transformer(dev, seed, **transformer),
        text_encoder=text_encoder(dev, seed + 5),
        tokenizer=llm_tokenizer(bos=dev, words=WORDS),
    )
    if vae:
        parts["vae"] = reference_vae(seed + 3)
    for name, part in parts.items():
        part.save_pretrained(root / name)
    return parts


def model_options(dev: bool, **more) -> dict:
    """diffcore.load_model("flux2", ...) options matching the tiny pipeline (``more`` wins)."""
    base = dict(
        variant=variant(dev), text_layers=list(LAYERS), max_sequence_length=MAX_LEN, shape={"axes_dim": list(AXES)}
    )
    return {**base, **more}
