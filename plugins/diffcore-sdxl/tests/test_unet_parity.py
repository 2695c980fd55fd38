"""diffcore's UNet against diffusers' UNet2DConditionModel with the same random weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from diffcore_sdxl.config import UNetConfig
from diffcore_sdxl.network import UNet
from sdxl_tiny import SD15_UNET, SDXL_UNET

from diffcore.testing import assert_outputs_close

diffusers = pytest.importorskip("diffusers")


def _pair(cfg: UNetConfig, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**cfg.to_diffusers(sample_size=16)).eval()
    ours = UNet(cfg).eval()
    # a plain load: the module names are diffusers' own
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _inputs(cfg: UNetConfig, batch: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([10.0, 725.0][:batch])
    ctx = torch.randn(batch, 11, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.addition_time_embed_dim:
        extra = {
            "pooled": torch.randn(batch, cfg.pooled_dim, generator=g),
            "time_ids": torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0]] * batch),
        }
    return x, t, ctx, extra


def _diffusers_kwargs(extra: dict) -> dict:
    if not extra:
        return {}
    return {"added_cond_kwargs": {"text_embeds": extra["pooled"], "time_ids": extra["time_ids"]}}


@pytest.mark.parametrize("cfg", [SDXL_UNET, SD15_UNET], ids=["sdxl", "sd15"])
def test_unet_matches_diffusers(cfg: UNetConfig) -> None:
    ours, ref = _pair(cfg)
    x, t, ctx, extra = _inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx, **_diffusers_kwargs(extra)).sample
        got = ours(x, t, ctx, **extra)
    assert got.shape == x.shape
    assert_outputs_close(got, want, atol=1e-4)


def test_controlnet_residuals_match_diffusers() -> None:
    cfg = SDXL_UNET
    ours, ref = _pair(cfg)
    x, t, ctx, extra = _inputs(cfg)
    skips = [16] * 3 + [8] * 3 + [4] * 3  # spatial size of each skip in push order
    chans = ours._skip_channels()
    g = torch.Generator().manual_seed(5)
    down = [torch.randn(2, c, s, s, generator=g) for c, s in zip(chans, skips)]
    mid = torch.randn(2, cfg.block_out_channels[-1], 4, 4, generator=g)
    with torch.no_grad():
        want = ref(
            x,
            t,
            ctx,
            down_block_additional_residuals=tuple(down),
            mid_block_additional_residual=mid,
            **_diffusers_kwargs(extra),
        ).sample
        got = ours(x, t, ctx, down_block_residuals=down, mid_block_residual=mid, **extra)
        plain = ours(x, t, ctx, **extra)
    assert_outputs_close(got, want, atol=1e-4)
    assert (got - plain).abs().max().item() > 1e-3


def test_gradient_checkpointing_gives_same_gradients() -> None:
    cfg = SD15_UNET
    ours, _ = _pair(cfg)
    ours.train()
    x, t, ctx, extra = _inputs(cfg)
    grads = []
    for enabled in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = enabled
        ours(x, t, ctx, **extra).square().mean().backward()
        grads.append(ours.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_odd_latent_size_runs() -> None:
    ours, _ = _pair(SD15_UNET)
    x, t, ctx, extra = _inputs(SD15_UNET, size=10)
    with torch.no_grad():
        assert ours(x[..., :9], t, ctx, **extra).shape == x[..., :9].shape
