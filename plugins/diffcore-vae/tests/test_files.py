"""Saving in both layouts, loading back (here and in diffusers), and clear errors for wrong files."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from safetensors.torch import load_file, save_file
from vae_reference import (
    TINY_4CH,
    TINY_16CH,
    TINY_FLUX2,
    check_against_diffusers_converter,
    make_flux2,
    make_kl,
)

import diffcore
from diffcore.errors import UserError


def _options(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("scaling_factor", "shift_factor")}


CASES = [
    ("sdxl", TINY_4CH, AutoencoderKL),
    ("flux", TINY_16CH, AutoencoderKL),
    ("flux2", TINY_FLUX2, AutoencoderKLFlux2),
]


@pytest.mark.parametrize("family,cfg,reference", CASES, ids=[c[0] for c in CASES])
@torch.no_grad()
def test_save_round_trips_in_both_layouts(tmp_path, family, cfg, reference):
    torch.manual_seed(0)
    ae = diffcore.load_autoencoder(family, **_options(cfg))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = ae.encode(x)
    pixels = ae.decode(z)
    flux2 = family == "flux2"

    folder = ae.save(tmp_path / "vae", layout="diffusers")
    assert json.loads((folder / "config.json").read_text())["_class_name"] == reference.__name__
    single = ae.save(tmp_path / "ae.safetensors", layout="original")

    for path in (folder, single):
        back = diffcore.load_autoencoder(family, path, norm_num_groups=cfg["norm_num_groups"])
        torch.testing.assert_close(back.encode(x), z, atol=0, rtol=0)
        torch.testing.assert_close(back.decode(z), pixels, atol=0, rtol=0)

    # diffusers reads the folder we wrote, and its own converter reads the original file
    theirs = reference.from_pretrained(folder).eval()
    mine = ae.module.state_dict()
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, mine[key]), key
    check_against_diffusers_converter(load_file(single), mine, len(cfg["block_out_channels"]), flux2)
    if not flux2:
        assert theirs.config.scaling_factor == ae.config.scaling_factor


def test_sample_option_draws_from_the_posterior():
    ae = diffcore.load_autoencoder("sd", sample=True, **_options(TINY_4CH))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    a = ae.encode(x, generator=torch.Generator().manual_seed(1))
    b = ae.encode(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, ae.encode(x, sample=False))


def test_float16_upcasts_when_force_upcast_and_bfloat16_is_kept():
    ae = diffcore.load_autoencoder("sdxl", dtype="float16", **_options(TINY_4CH))
    assert ae.dtype == torch.float32  # SDXL's VAE overflows float16
    x = torch.rand(1, 3, 16, 16, dtype=torch.float16) * 2 - 1
    assert ae.encode(x).dtype == torch.float16  # outputs come back in the input's dtype
    plain = diffcore.load_autoencoder("sdxl", dtype="float16", force_upcast=False, **_options(TINY_4CH))
    assert plain.dtype == torch.float16
    bf16 = diffcore.load_autoencoder("flux", dtype="bfloat16", **_options(TINY_16CH))
    assert bf16.dtype == torch.bfloat16


def _err(excinfo) -> str:
    return str(excinfo.value)


def test_a_file_without_autoencoder_weights_is_a_user_error(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(UserError) as e:
        diffcore.load_autoencoder("sdxl", path)
    assert "no autoencoder weights" in _err(e) and str(path) in _err(e)


def test_a_pickle_is_refused(tmp_path):
    path = tmp_path / "vae.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(UserError, match="only .safetensors"):
        diffcore.load_autoencoder("sd", path)


def test_wrong_family_is_a_user_error(tmp_path):
    kl = make_kl(TINY_16CH)
    kl.save_pretrained(tmp_path / "flux1")
    with pytest.raises(UserError) as e:
        diffcore.load_autoencoder("flux2", tmp_path / "flux1", norm_num_groups=8)
    assert "not a 'flux2' autoencoder" in _err(e) and "use family 'sd'" in _err(e)
    with pytest.raises(UserError) as e:
        diffcore.load_autoencoder("sdxl", tmp_path / "flux1", norm_num_groups=8)
    assert "16 latent channels" in _err(e) and "'sd3' or 'flux'" in _err(e)
    make_flux2(TINY_FLUX2).save_pretrained(tmp_path / "flux2")
    with pytest.raises(UserError, match="use family 'flux2'"):
        diffcore.load_autoencoder("flux", tmp_path / "flux2", norm_num_groups=8)


def test_truncated_checkpoint_names_the_missing_keys(tmp_path):
    sd = {k: v.contiguous() for k, v in make_kl(TINY_4CH).state_dict().items()}
    sd.pop("decoder.conv_out.weight")
    save_file(sd, str(tmp_path / "vae.safetensors"))
    with pytest.raises(UserError) as e:
        diffcore.load_autoencoder("sdxl", tmp_path / "vae.safetensors", norm_num_groups=8)
    assert "missing" in _err(e) and "decoder.conv_out.weight" in _err(e)


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="norm_num_groups"):
        diffcore.load_autoencoder("sd", block_out_channels=[12, 24], norm_num_groups=8)
    ae = diffcore.load_autoencoder("sd", **_options(TINY_4CH))
    with pytest.raises(UserError, match="one file"):
        ae.save(tmp_path / "folder", layout="original")
    with pytest.raises(UserError, match="unknown layout"):
        ae.save(tmp_path / "x.safetensors", layout="kohya")


def test_wrong_input_shapes_are_user_errors():
    ae = diffcore.load_autoencoder(
        "flux2", block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8
    )
    with pytest.raises(UserError, match=r"pixels of shape \(batch, 3, height, width\)"):
        ae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(UserError, match="not a multiple of 4"):
        ae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(UserError, match=r"latents of shape \(batch, 128"):
        ae.decode(torch.zeros(1, 32, 4, 4))


def test_widths_a_single_file_gives_that_the_default_groups_do_not_divide(tmp_path):
    ae = diffcore.load_autoencoder("sd", block_out_channels=[8, 16], norm_num_groups=8, layers_per_block=1)
    file = ae.save(tmp_path / "narrow.safetensors", layout="original")
    with pytest.raises(UserError) as e:  # a single file cannot say its groups: the default 32 is assumed
        diffcore.load_autoencoder("sd", file)
    assert e.value.where == str(file) and "[8, 16]" in e.value.message
    assert "norm_num_groups, e.g. 8" in (e.value.hint or "")
    assert diffcore.load_autoencoder("sd", file, norm_num_groups=8).config.block_out_channels == [8, 16]
    folder = ae.save(tmp_path / "vae", layout="diffusers")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "norm_num_groups": 3}))
    with pytest.raises(UserError) as e:  # a folder's config.json states them, so it is what to fix
        diffcore.load_autoencoder("sd", folder)
    assert e.value.where == str(folder / "config.json") and "config.json" in (e.value.hint or "")
