"""Tiled encode/decode.

Stated tolerance: a VAE's GroupNorms see one tile's statistics instead of the image's, so tiling is an
approximation everywhere, not only at seams. Away from the seams (pixels covered by one tile only, at
least 8 px from any overlap band), the tiled decode of a tiny random VAE agrees with the untiled one
to a mean absolute error under 10% of the output's standard deviation, and is no worse than diffusers'
own tiled decode with the same tile size and overlap (within 10%). The blending itself is exact: for a
purely local network, tiled and untiled outputs agree to 1e-6 wherever tile edges are out of reach.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from diffcore_vae.tiling import starts, tiled
from vae_reference import TINY_4CH, make_kl

import diffcore

# narrower than TINY_4CH: these tests decode 384 px images several times
TILING_CFG = {**TINY_4CH, "block_out_channels": [8, 16, 16], "norm_num_groups": 4}


def test_starts_cover_the_image_with_full_tiles():
    assert starts(100, 40, 10) == [0, 30, 60]
    assert starts(40, 40, 10) == [0]
    assert starts(70, 40, 10) == [0, 30]


def test_blending_is_exact_for_a_local_network():
    torch.manual_seed(0)
    # three 3x3 convs: each output pixel depends on inputs at most 3 px away
    net = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)])
    x = torch.randn(1, 3, 100, 100)
    with torch.no_grad():
        full = net(x)
        out = tiled(net, x, tile=40, overlap=20, scale=Fraction(1))
    # the ramps give tile-edge pixels small but nonzero weight: compare where no tile edge is within reach
    reach = 3
    edges = {e for s in starts(100, 40, 20) for e in (s, s + 40)} - {0, 100}
    ok = torch.ones(100, dtype=torch.bool)
    for e in edges:
        ok[max(e - reach - 1, 0) : e + reach + 1] = False
    mask = ok[:, None] & ok[None, :]
    torch.testing.assert_close(out[..., mask], full[..., mask], atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    vae = make_kl(TILING_CFG, seed=0)
    folder = tmp_path_factory.mktemp("tiling") / "vae"
    vae.save_pretrained(folder)
    return vae, folder


def _away_from_seams(size: int, tile: int, overlap: int, margin: int = 8) -> torch.Tensor:
    cover = torch.zeros(size)
    for s in starts(size, tile, overlap):
        cover[s : s + tile] += 1
    one = (cover == 1).float()[None, None]
    one = -F.max_pool1d(-one, 2 * margin + 1, 1, margin)[0, 0]  # erode by margin
    return (one[:, None] * one[None, :]) > 0


@torch.no_grad()
def test_tiled_decode_agrees_away_from_seams(vae_folder):
    vae, folder = vae_folder
    tile, overlap = 256, 64
    plain = diffcore.load_autoencoder("sdxl", folder, norm_num_groups=4)
    tiles = diffcore.load_autoencoder(
        "sdxl", folder, norm_num_groups=4, tiling=True, tile_size=tile, tile_overlap=overlap
    )
    # smooth latents, like a real image's
    z = F.interpolate(
        torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), size=(96, 96), mode="bilinear"
    )
    full, ours = plain.decode(z), tiles.decode(z)
    assert ours.shape == full.shape == (1, 3, 384, 384)

    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = (
        tile,
        tile // 4,
        overlap / tile,
    )
    theirs = vae.decode(z / TINY_4CH["scaling_factor"]).sample

    mask = _away_from_seams(384, tile, overlap)
    assert mask.float().mean() > 0.3
    ours_err = (ours - full).abs()[..., mask].mean()
    theirs_err = (theirs - full).abs()[..., mask].mean()
    assert ours_err < 0.1 * full.std()
    assert ours_err <= 1.1 * theirs_err


@torch.no_grad()
def test_tiled_encode_and_one_tile_cases(vae_folder):
    vae, folder = vae_folder
    plain = diffcore.load_autoencoder("sdxl", folder, norm_num_groups=4)
    tiles = diffcore.load_autoencoder(
        "sdxl", folder, norm_num_groups=4, tiling=True, tile_size=128, tile_overlap=32
    )
    x = F.interpolate(
        torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1, size=(256, 192)
    )
    a, b = plain.encode(x), tiles.encode(x)
    assert b.shape == a.shape == (1, 4, 64, 48)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 128, 32, 0.25
    theirs = vae.encode(x).latent_dist.mean * TINY_4CH["scaling_factor"]
    assert (a - b).abs().mean() <= 1.1 * (a - theirs).abs().mean()
    # an image no larger than a tile goes through untiled, bit for bit
    small = x[..., :128, :128]
    assert torch.equal(plain.encode(small), tiles.encode(small))
    assert torch.equal(plain.decode(a[..., :32, :32]), tiles.decode(a[..., :32, :32]))


def test_tiled_flux2_decode_keeps_shapes():
    ae = diffcore.load_autoencoder(
        "flux2",
        block_out_channels=[16, 32],
        layers_per_block=1,
        norm_num_groups=8,
        tiling=True,
        tile_size=32,
        tile_overlap=8,
    )
    z = torch.randn(1, 128, 6, 5)
    with torch.no_grad():
        out = ae.decode(z)
    assert out.shape == (1, 3, 24, 20) and torch.isfinite(out).all()
