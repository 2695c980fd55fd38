"""Flux.1's FLOPs count (MFU's numerator) against torch's own count of the same forward."""

from __future__ import annotations

import pytest
import torch
from _flux_tiny import LATENT_CHANNELS, SIZES, TEXT_DIM
from diffcore_flux.flops import forward_flops
from diffcore_flux.packing import image_ids, pack, text_ids
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import diffcore


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_flops_equal_torch_flop_counter(variant):
    """Image and text streams over their own tokens, joint attention over both, modulations once."""
    model = diffcore.load_model("flux", variant=variant, load_encoders=False, max_sequence_length=5, **SIZES)
    h, w, length = 6, 8, 5
    latents = torch.randn(1, LATENT_CHANNELS, h, w)
    guidance = torch.full((1,), 3.5) if variant == "dev" else None
    args = (pack(latents), image_ids(h, w), torch.randn(1, length, TEXT_DIM), text_ids(length), torch.rand(1),
            torch.randn(1, TEXT_DIM), guidance)  # fmt: skip
    # the math backend runs attention as matmuls, which the counter sees
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model.backbone(*args)
    assert model.flops_per_sample(latents) == counter.get_total_flops()
    assert forward_flops(model.backbone, (h // 2) * (w // 2), length) == counter.get_total_flops()


@pytest.mark.parametrize("variant", ["klein-4b", "dev"])
def test_flux2_flops_equal_torch_flop_counter(variant):
    from _flux2_tiny import AXES
    from _flux2_tiny import LATENT_CHANNELS as CHANNELS
    from _flux2_tiny import TEXT_DIM as CONTEXT
    from diffcore_flux.flux2.edit import flatten, grid_ids
    from diffcore_flux.flux2.edit import text_ids as flux2_text_ids

    shape = dict(hidden_size=32, num_heads=2, depth=2, depth_single=2, axes_dim=list(AXES), in_channels=CHANNELS,
                 context_in_dim=CONTEXT)  # fmt: skip
    model = diffcore.load_model("flux2", variant=variant, max_sequence_length=5, load_encoders=False, shape=shape)
    h, w, length = 3, 4, 5
    latents = torch.randn(1, CHANNELS, h, w)
    guidance = torch.full((1,), 3.5) if variant == "dev" else None
    args = (flatten(latents), grid_ids(h, w), torch.randn(1, length, CONTEXT), flux2_text_ids(length), torch.rand(1),
            guidance)  # fmt: skip
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model.backbone(*args)
    assert model.flops_per_sample(latents) == counter.get_total_flops()
