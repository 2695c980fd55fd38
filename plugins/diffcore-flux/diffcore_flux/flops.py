"""The Flux.1 transformer's forward FLOPs for one sample, counted from its layers (see
:mod:`diffcore.flops`)."""

from __future__ import annotations

from diffcore.flops import attention_flops, linear_flops
from diffcore_flux.network import FluxTransformer


def forward_flops(net: FluxTransformer, image_tokens: int, text_tokens: int) -> int:
    """Matmul FLOPs of ``net`` on ``image_tokens`` packed latent tokens and ``text_tokens`` T5
    tokens: each stream's projections over its own tokens, joint attention over both, the
    once-per-sample embeddings and modulations."""
    tokens = image_tokens + text_tokens
    total = image_tokens * linear_flops(net.img_in) + text_tokens * linear_flops(net.txt_in)
    total += linear_flops(net.time_in, net.vector_in, net.guidance_in)  # Identity when there is no guidance
    for block in net.double_blocks:
        total += image_tokens * linear_flops(block.img_attn, block.img_mlp)
        total += text_tokens * linear_flops(block.txt_attn, block.txt_mlp)
        total += linear_flops(block.img_mod, block.txt_mod) + attention_flops(tokens, tokens, block.img_attn.proj.in_features)
    for single in net.single_blocks:
        total += tokens * linear_flops(single.linear1, single.linear2) + linear_flops(single.modulation)
        total += attention_flops(tokens, tokens, single.dim)
    final = net.final_layer
    return total + image_tokens * linear_flops(final.linear) + linear_flops(final.adaLN_modulation)
