"""Test helpers: tiny random diffusers autoencoders and their weights written in each layout.

The original-layout writer here is independent of diffcore_vae.convert, and is itself checked against
diffusers' own single-file converter (``convert_ldm_vae_checkpoint``) before a test relies on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

TINY_4CH = dict(
    block_out_channels=[16, 32, 32],
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    scaling_factor=0.13025,
)
TINY_16CH = dict(
    block_out_channels=[16, 32],
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TINY_FLUX2 = dict(
    block_out_channels=[16, 32, 32],
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=32,
)


def _blocks(n: int) -> dict:
    return dict(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norm affines and batch-norm statistics included), so that parity
    tests exercise every parameter rather than identity norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        bn = getattr(module, "bn", None)
        if bn is not None:
            bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))


def make_kl(config: dict, seed: int = 0) -> AutoencoderKL:
    vae = AutoencoderKL(**_blocks(len(config["block_out_channels"])), **config)
    randomize(vae, seed)
    return vae.eval()


def make_flux2(config: dict, seed: int = 0) -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(**_blocks(len(config["block_out_channels"])), **config)
    randomize(vae, seed)
    return vae.eval()


def original_state_dict(diffusers_sd: dict[str, torch.Tensor], levels: int, flux2: bool = False) -> dict:
    """diffusers keys -> the LDM/BFL layout (written independently of the code under test)."""
    out = {}
    for key, value in diffusers_sd.items():
        k = key
        k = re.sub(r"conv_norm_out", "norm_out", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.",
            k,
        )
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
            k,
        )
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        for a, b in (
            ("group_norm", "norm"),
            ("to_q", "q"),
            ("to_k", "k"),
            ("to_v", "v"),
            ("to_out.0", "proj_out"),
        ):
            k = k.replace(f"mid.attn_1.{a}.", f"mid.attn_1.{b}.")
        k = k.replace("conv_shortcut", "nin_shortcut")
        if flux2 and k.startswith("quant_conv."):
            k = "encoder." + k
        if flux2 and k.startswith("post_quant_conv."):
            k = "decoder." + k
        if "mid.attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[k] = value.contiguous()
    return out


def check_against_diffusers_converter(original: dict, diffusers_sd: dict, levels: int, flux2: bool) -> None:
    """The test's original layout converts back to the diffusers one with diffusers' own converter."""
    ldm = dict(original)
    if flux2:
        for a, b in (
            ("encoder.quant_conv.", "quant_conv."),
            ("decoder.post_quant_conv.", "post_quant_conv."),
        ):
            for k in [k for k in ldm if k.startswith(a)]:
                ldm[b + k[len(a) :]] = ldm.pop(k)
        for k in [k for k in ldm if k.startswith("bn.")]:
            ldm.pop(k)
    back = convert_ldm_vae_checkpoint(ldm, _blocks(levels))
    expected = {k: v for k, v in diffusers_sd.items() if not k.startswith("bn.")}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k].reshape(v.shape), v), k


def write_layouts(vae, tmp: Path, flux2: bool = False) -> dict[str, Path]:
    """The same weights as: a diffusers vae/ folder, a pipeline folder, a standalone original file,
    and a full single file with ``first_stage_model.`` keys (KL) or BFL's ae layout (Flux.2)."""
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    original = original_state_dict(sd, levels, flux2)
    check_against_diffusers_converter(original, sd, levels, flux2)
    paths = {"diffusers": tmp / "pipe" / "vae", "pipeline": tmp / "pipe", "original": tmp / "ae.safetensors"}
    vae.save_pretrained(paths["diffusers"], safe_serialization=True)
    save_file(original, str(paths["original"]))
    if not flux2:
        full = {f"first_stage_model.{k}": v for k, v in original.items()}
        full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
        full["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
        paths["single_file"] = tmp / "sd_full.safetensors"
        save_file(full, str(paths["single_file"]))
    return paths
