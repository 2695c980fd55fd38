"""The UNet's FLOPs count (MFU's numerator) against torch's own count of the same forward."""

import pytest
import torch
from diffcore_sdxl.flops import TEXT_TOKENS, forward_flops
from diffcore_sdxl.network import UNet
from sdxl_tiny import SD15_UNET, SDXL_UNET
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def _counted(unet: UNet, height: int, width: int) -> int:
    cfg = unet.config
    args = [torch.randn(1, cfg.in_channels, height, width), torch.tensor([10.0]),
            torch.randn(1, TEXT_TOKENS, cfg.cross_attention_dim)]  # fmt: skip
    if cfg.addition_time_embed_dim is not None:
        args += [torch.randn(1, cfg.addition_input_dim - 6 * cfg.addition_time_embed_dim), torch.zeros(1, 6)]
    # the math backend runs attention as matmuls, which the counter sees
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        unet(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("config", [SDXL_UNET, SD15_UNET], ids=["sdxl", "sd15"])
@pytest.mark.parametrize("size", [(16, 16), (10, 14)], ids=["square", "odd"])
def test_unet_flops_equal_torch_flop_counter(config, size):
    """Every convolution at its level's resolution (10 -> 5 -> 3 when halving an odd size),
    projections, self-attention over the level's tokens and cross-attention over 77 text tokens."""
    torch.manual_seed(0)
    unet = UNet(config)
    assert forward_flops(unet, *size) == _counted(unet, *size)


def test_the_model_reports_it_per_sample():
    import diffcore

    unet = {"block_out_channels": [12, 24, 24], "attention": [True, True, False], "transformer_layers": [1, 2, 1],
            "heads": [2, 2, 2], "cross_attention_dim": 64, "norm_groups": 4}  # fmt: skip
    model = diffcore.load_model("sd15", unet=unet, load_encoders=False)
    small, large = (model.flops_per_sample(torch.zeros(1, 4, s, s)) for s in (8, 16))
    assert small == forward_flops(model.backbone, 8, 8)
    assert large == forward_flops(model.backbone, 16, 16) and 3 * small < large < 16 * small  # ~ the area
