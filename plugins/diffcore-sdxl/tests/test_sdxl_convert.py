"""``diffcore convert`` on a tiny SDXL pipeline (UNet, both text encoders, VAE): folder -> single
file -> folder and kohya -> PEFT -> kohya give back the same tensors, bit for bit; detection tells
SDXL, SD 1.x and SD 2.x apart."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
from safetensors.torch import load_file
from sdxl_tiny import SD15_UNET, make_sdxl_pipeline

import diffcore
from diffcore.cli import main
from diffcore.layouts import detect, probe

pytest.importorskip("diffusers")
pytest.importorskip("diffcore_lora")

# a single file does not say the tiny VAE's group count (the released VAEs use 32)
VAE_GROUPS = ["--model-option", "vae_options={norm_num_groups: 4}"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    # transformers 5 saves CLIPTextModel without the published ``text_model.`` level; diffcore writes
    # the published names (those every released pipeline has), so compare under those
    return {k if k.startswith(("text_model.", "text_projection")) or "/text_encoder" not in str(path) else "text_model." + k: v
            for k, v in load_file(str(path)).items()}


def _assert_same(a: Path, b: Path) -> None:
    x, y = _tensors(a), _tensors(b)
    assert sorted(x) == sorted(y), a
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    make_sdxl_pipeline(folder)
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).save_pretrained(folder / "vae")
    return folder


def test_folder_to_single_file_to_folder_is_bit_exact(pipe: Path, tmp_path: Path) -> None:
    single = tmp_path / "sdxl.safetensors"
    assert main(["convert", str(pipe), "-o", str(single)]) == 0
    keys = load_file(str(single))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert any(k.startswith("conditioner.embedders.1.model.") for k in keys)  # OpenCLIP layout
    assert "first_stage_model.decoder.conv_out.weight" in keys
    tokenizers = ["--model-option", f"tokenizer={pipe / 'tokenizer'}", "--model-option", f"tokenizer_2={pipe / 'tokenizer_2'}"]
    back = tmp_path / "back"
    assert main(["convert", str(single), "-o", str(back), *VAE_GROUPS, *tokenizers]) == 0
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        _assert_same(pipe / part, back / part)
    again = tmp_path / "again.safetensors"
    assert main(["convert", str(back), "-o", str(again)]) == 0
    _assert_same(single, again)


def test_kohya_to_peft_to_kohya_is_bit_exact_with_text_encoders(pipe: Path, tmp_path: Path) -> None:
    model = diffcore.load_model("sdxl", pretrained=str(pipe), autoencoder=False)
    adapter = diffcore.build_component("adapter", "lora", {"rank": 4, "alpha": 3.0, "text_encoders": True})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapter.attach(model):
            p.normal_(0.0, 0.2)
    adapter.save(tmp_path / "kohya.safetensors", "kohya")
    # the adapter's layers are the UNet's and text encoders': the VAE need not load
    base = ["--base", str(pipe), "--model-option", "autoencoder=false"]
    assert main(["convert", str(tmp_path / "kohya.safetensors"), "-o", str(tmp_path / "peft.safetensors"), *base]) == 0
    peft = load_file(str(tmp_path / "peft.safetensors"))
    assert any(k.startswith("unet.down_blocks.") for k in peft)
    assert any(k.startswith("text_encoder_2.") for k in peft)
    assert main(["convert", str(tmp_path / "peft.safetensors"), "-o", str(tmp_path / "again.safetensors"), *base]) == 0
    x, y = load_file(str(tmp_path / "kohya.safetensors")), load_file(str(tmp_path / "again.safetensors"))
    assert sorted(x) == sorted(y) and any(k.startswith("lora_te2_") for k in x)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_detection_tells_the_families_apart(pipe: Path, tmp_path: Path) -> None:
    assert [(c.name, c.layout) for c in detect(probe(pipe))] == [("sdxl", "diffusers")]
    sd15 = diffcore.load_model("sd15", unet=attrs.asdict(SD15_UNET), load_encoders=False)
    file = sd15.save_pretrained(tmp_path / "sd15.safetensors", layout="original")
    assert [(c.name, c.layout) for c in detect(probe(file))] == [("sd15", "original")]
    # SD 2.x projects into its transformers with Linear layers: the same UNet otherwise
    sd21 = diffcore.load_model("sd21", unet={**attrs.asdict(SD15_UNET), "linear_projection": True}, load_encoders=False)
    file = sd21.save_pretrained(tmp_path / "sd21.safetensors", layout="original")
    assert [(c.name, c.layout) for c in detect(probe(file))] == [("sd21", "original")]
