"""FLOP counting from module shapes, for ``DiffusionModel.flops_per_sample``.

A model counts its forward pass from the layers it holds, never from a table per size: each helper
reads the layer's own dimensions. One FLOP is one multiply or one add, so a matmul of (m, k) by
(k, n) is ``2 * m * k * n`` (the figure torch.utils.flop_counter gives); biases, norms, activations
and other element-wise work are left out, as everyone who reports MFU leaves them out.
"""

from __future__ import annotations

from torch import nn


def linear_flops(*modules: nn.Module) -> int:
    """FLOPs of every ``nn.Linear`` in ``modules`` (and their submodules) applied to one token."""
    return sum(
        2 * layer.in_features * layer.out_features
        for module in modules
        for layer in module.modules()
        if isinstance(layer, nn.Linear)
    )


def conv_output_size(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """The spatial size a Conv2d gives for a (height, width) input."""
    if conv.padding == "same":
        return height, width
    padding = (0, 0) if isinstance(conv.padding, str) else tuple(conv.padding)  # "valid"
    sizes = [
        (size + 2 * int(p) - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip((height, width), conv.kernel_size, conv.stride, padding, conv.dilation)
    ]
    return sizes[0], sizes[1]


def conv_flops(conv: nn.Conv2d, height: int, width: int) -> int:
    """FLOPs of a Conv2d on one (C, height, width) input."""
    out_h, out_w = conv_output_size(conv, height, width)
    k_h, k_w = conv.kernel_size
    return 2 * (conv.in_channels // conv.groups) * k_h * k_w * conv.out_channels * out_h * out_w


def attention_flops(queries: int, keys: int, dim: int) -> int:
    """FLOPs of softmax attention over all heads: ``q @ k^T`` and ``weights @ v`` for ``queries``
    query tokens against ``keys`` key tokens, ``dim`` = heads x head size."""
    return 4 * queries * keys * dim
