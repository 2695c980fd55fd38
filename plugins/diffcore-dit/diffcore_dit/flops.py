"""The DiT's forward FLOPs for one sample, counted from its layers (see :mod:`diffcore.flops`)."""

from __future__ import annotations

from diffcore.flops import attention_flops, conv_flops, linear_flops
from diffcore_dit.network import DiT


def forward_flops(net: DiT, height: int, width: int) -> int:
    """Matmul FLOPs of ``net`` on one latent of ``height`` x ``width``: the patch embedding, the
    per-token projections and attention of every block, the once-per-sample conditioning
    (timestep MLP, adaLN modulations) and the final projection."""
    conv = net.x_embedder.proj
    rows, cols = height // conv.stride[0], width // conv.stride[1]
    tokens = rows * cols
    total = conv_flops(conv, height, width) + linear_flops(net.t_embedder)
    for block in net.blocks:
        total += tokens * linear_flops(block.attn, block.mlp) + linear_flops(block.adaLN_modulation)
        total += attention_flops(tokens, tokens, block.attn.proj.in_features)
    final = net.final_layer
    return total + tokens * linear_flops(final.linear) + linear_flops(final.adaLN_modulation)
