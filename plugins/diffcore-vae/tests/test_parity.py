"""Parity with diffusers' AutoencoderKL (4 and 16 channels) and AutoencoderKLFlux2, fp32, through
every checkpoint layout: the same random weights written as a diffusers folder, a pipeline folder, an
original standalone file and a full single file are loaded with ``diffcore.load_autoencoder``."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from vae_reference import TINY_4CH, TINY_16CH, TINY_FLUX2, make_flux2, make_kl, write_layouts

import diffcore

ATOL = RTOL = 1e-5


def _pixels(seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


KL_CASES = [("sdxl", TINY_4CH), ("sd3", TINY_16CH)]
KL_LAYOUTS = ["diffusers", "pipeline", "original", "single_file"]


@pytest.fixture(scope="module", params=KL_CASES, ids=[c[0] for c in KL_CASES])
def kl_case(request, tmp_path_factory):
    family, cfg = request.param
    vae = make_kl(cfg, seed=3)
    paths = write_layouts(vae, tmp_path_factory.mktemp(family))
    return family, cfg, vae, paths


@pytest.mark.parametrize("layout", KL_LAYOUTS)
@torch.no_grad()
def test_kl_encode_decode_match_diffusers(kl_case, layout):
    family, cfg, vae, paths = kl_case
    ae = diffcore.load_autoencoder(family, paths[layout], norm_num_groups=cfg["norm_num_groups"])
    down = 2 ** (len(cfg["block_out_channels"]) - 1)
    assert ae.latent_channels == cfg["latent_channels"] and ae.downscale == down
    scale, shift = cfg["scaling_factor"], cfg.get("shift_factor") or 0.0
    x = _pixels()

    dist = vae.encode(x).latent_dist
    _close(ae.encode(x), (dist.mean - shift) * scale)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    _close(ae.encode(x, sample=True, generator=g1), (dist.sample(generator=g2) - shift) * scale)

    z = torch.randn(
        2, cfg["latent_channels"], 32 // down, 32 // down, generator=torch.Generator().manual_seed(5)
    )
    _close(ae.decode(z), vae.decode(z / scale + shift).sample)


@pytest.fixture(scope="module")
def flux2_case(tmp_path_factory):
    vae = make_flux2(TINY_FLUX2, seed=4)
    paths = write_layouts(vae, tmp_path_factory.mktemp("flux2"), flux2=True)
    return vae, paths


def _bn(vae):
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


@pytest.mark.parametrize("layout", ["diffusers", "pipeline", "original"])
@torch.no_grad()
def test_flux2_encode_decode_match_diffusers_pipeline_math(flux2_case, layout):
    vae, paths = flux2_case
    ae = diffcore.load_autoencoder("flux2", paths[layout], norm_num_groups=8)
    assert ae.latent_channels == 128 and ae.downscale == 8
    x = _pixels(size=32)
    mean, std = _bn(vae)

    # Flux2Pipeline._encode_vae_image: posterior mean, patchify, batch-norm statistics
    reference = (Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode()) - mean) / std
    _close(ae.encode(x), reference)

    z = torch.randn(2, 128, 4, 4, generator=torch.Generator().manual_seed(9))
    # the pipeline's decode: undo the statistics, unpatchify, decode
    expected = vae.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample
    _close(ae.decode(z), expected)


def test_flux2_patchify_order_is_c_pi_pj():
    from diffcore_vae.network import patchify, unpatchify

    z = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    p = patchify(z, 2, 2)
    # channel index c*4 + pi*2 + pj holds z[c, 2i+pi, 2j+pj]
    assert p[0, 1 * 4 + 1 * 2 + 0, 1, 0] == z[0, 1, 3, 0]
    torch.testing.assert_close(p, Flux2Pipeline._patchify_latents(z))
    torch.testing.assert_close(unpatchify(p, 2, 2), z)
