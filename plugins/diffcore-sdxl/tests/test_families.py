"""Discovery stays torch-free; SD2.x: v-prediction, OpenCLIP-H single files with 24 or 23 layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sdxl_tiny import write_tokenizer_files

import diffcore
from diffcore.testing import assert_entry_points_light

SD21_UNET = {
    "block_out_channels": [32, 64],
    "attention": [True, False],
    "transformer_layers": [1, 1],
    "heads": [1, 1],
    "cross_attention_dim": 64,
}
SD21_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "vocab_size": 102,
}


def test_entry_point_imports_no_torch() -> None:
    assert assert_entry_points_light("diffcore-sdxl") == ["diffcore_sdxl.plugin"]


def test_registering_the_models_imports_no_torch() -> None:
    # calling the hook (not only importing the module) stays light too: the factories import lazily
    code = "import sys, diffcore_sdxl.plugin as p; p.diffcore_register_models(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_registered_models() -> None:
    registry = diffcore.get_registry()
    assert {"sdxl", "sd15", "sd21"} <= set(registry.names("model"))
    assert registry.get("model", "sdxl").spec.config.__name__ == "SDXLConfig"


def test_sd21_v_prediction_and_single_file_text_layers(tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path / "tok")
    from transformers import CLIPTokenizer

    CLIPTokenizer(
        str(tmp_path / "tok/vocab.json"), str(tmp_path / "tok/merges.txt"), model_max_length=77
    ).save_pretrained(str(tmp_path / "tokenizer"))
    torch.manual_seed(0)
    opts = dict(
        unet=SD21_UNET, text_encoder=SD21_TEXT, tokenizer=str(tmp_path / "tokenizer"), autoencoder=False
    )
    model = diffcore.load_model("sd21", **opts)
    assert model.prediction_type == "v" and model.config.resolution == 768
    assert model.default_scheduler["beta_schedule"] == "scaled_linear"
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        want = model.predict(latents, t, model.encode_conditions({"captions": ["a cat"]}))

    file = model.save_pretrained(tmp_path / "sd21.safetensors", layout="original")
    state = load_file(str(file))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state
    # a released SD2 file has one more OpenCLIP layer than the HF tower uses (its output is the
    # penultimate one): add a junk last layer and drop our marker, as in a file from elsewhere
    for key in [k for k in state if ".resblocks.1." in k]:
        state[key.replace(".resblocks.1.", ".resblocks.2.")] = torch.randn_like(state[key])
    save_file(state, str(tmp_path / "released.safetensors"))
    for path in (file, tmp_path / "released.safetensors"):
        opts = dict(tokenizer=str(tmp_path / "tokenizer"), autoencoder=False, unet={"heads": [1, 1]})
        again = diffcore.load_model("sd21", pretrained=str(path), **opts)
        assert again.frozen["te1"].config.num_hidden_layers == 2
        with torch.no_grad():
            got = again.predict(latents, t, again.encode_conditions({"captions": ["a cat"]}))
        # same weights, so only fp32 summation order may differ: an earlier test in the same process
        # can leave torch with another thread count, which moves a few elements by ~3 ulp
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_repeated_blocks_are_the_transformer_block_lists() -> None:
    unet = {"block_out_channels": [12, 24, 24], "attention": [True, True, False], "transformer_layers": [1, 2, 1],
            "heads": [2, 2, 2], "cross_attention_dim": 64, "norm_groups": 4}
    model = diffcore.load_model("sd15", unet=unet, load_encoders=False)
    paths = model.repeated_blocks()
    assert paths and all(p.endswith("transformer_blocks") for p in paths)
    lists = [model.backbone.get_submodule(p) for p in paths]
    assert all(isinstance(m, torch.nn.ModuleList) for m in lists)
    # every BasicTransformerBlock-like unit of the UNet is covered exactly once
    counted = sum(len(m) for m in lists)
    total = sum(1 for n, _ in model.backbone.named_modules() if n.rsplit(".", 1)[0].endswith("transformer_blocks") and n.rsplit(".", 1)[1].isdigit())
    assert counted == total > 0
