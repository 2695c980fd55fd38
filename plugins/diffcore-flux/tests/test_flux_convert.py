"""``diffcore convert`` on a tiny Flux.1 transformer: diffusers folder -> BFL single file -> folder and
kohya -> PEFT -> kohya (fused qkv and linear1 included) give back the same tensors, bit for bit;
``--merge`` equals the adapter applied at strength 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _flux_tiny import AXES, reference_transformer
from safetensors.torch import load_file
from test_flux_transformer import _inputs, _our_out

import diffcore
from diffcore.cli import main
from diffcore.layouts import detect, probe

pytest.importorskip("diffusers")
pytest.importorskip("diffcore_lora")

AXES_OPTION = ["--model-option", f"axes_dim={AXES}"]  # a BFL file does not store the RoPE split


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flux")
    reference_transformer(guidance=True).save_pretrained(root / "transformer")
    model = diffcore.load_model("flux", pretrained=root / "transformer", axes_dim=AXES)
    adapter = diffcore.build_component("adapter", "lora", {"rank": 4, "alpha": 2.0})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapter.attach(model):
            p.normal_(0.0, 0.3)
    adapter.save(root / "lora.safetensors", "kohya")
    return root


def _same(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y)
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def test_folder_to_bfl_file_to_folder_is_bit_exact(flux: Path, tmp_path: Path) -> None:
    single = tmp_path / "flux1-dev.safetensors"
    assert main(["convert", str(flux / "transformer"), "-o", str(single)]) == 0
    assert [(c.name, c.layout) for c in detect(probe(single))] == [("flux", "original")]
    assert "double_blocks.0.img_attn.qkv.weight" in load_file(str(single))
    assert main(["convert", str(single), "-o", str(tmp_path / "back"), *AXES_OPTION]) == 0
    _same(flux / "transformer" / "diffusion_pytorch_model.safetensors", tmp_path / "back" / "diffusion_pytorch_model.safetensors")


def test_kohya_to_peft_to_kohya_is_bit_exact(flux: Path, tmp_path: Path) -> None:
    base = ["--base", str(flux / "transformer")]
    assert main(["convert", str(flux / "lora.safetensors"), "-o", str(tmp_path / "peft.safetensors"), *base]) == 0
    peft = load_file(str(tmp_path / "peft.safetensors"))
    # BFL's fused layers are written as diffusers' parts
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in peft
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in peft
    assert main(["convert", str(tmp_path / "peft.safetensors"), "-o", str(tmp_path / "kohya.safetensors"), *base]) == 0
    _same(flux / "lora.safetensors", tmp_path / "kohya.safetensors")


def test_merge_equals_the_adapter_applied(flux: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged.safetensors"
    code = main(["convert", str(flux / "transformer"), "--merge", str(flux / "lora.safetensors"), "--to", "original", "-o", str(merged)])
    assert code == 0
    applied = diffcore.load_model("flux", pretrained=flux / "transformer", axes_dim=AXES)
    diffcore.build_component("adapter", "lora", {}).from_file(applied, flux / "lora.safetensors", 1.0)
    plain = diffcore.load_model("flux", pretrained=flux / "transformer", axes_dim=AXES)
    ours = diffcore.load_model("flux", pretrained=merged, axes_dim=AXES)
    x = _inputs(True)
    want, got = _our_out(applied, x), _our_out(ours, x)
    assert (want - _our_out(plain, x)).abs().max() > 1e-2  # the adapter changes the output at all
    assert (got - want).abs().max() < 1e-5


def test_flux2_round_trips_are_bit_exact(tmp_path: Path) -> None:
    import json

    from _flux2_tiny import model_options, write_pipeline

    write_pipeline(tmp_path / "f2", False)
    options = model_options(False)
    flags = [a for k, v in options.items() for a in ("--model-option", f"{k}={json.dumps(v)}")]
    assert [(c.name, c.layout) for c in detect(probe(tmp_path / "f2"))] == [("flux2", "diffusers")]
    model = diffcore.load_model("flux2", pretrained=tmp_path / "f2", **options)
    adapter = diffcore.build_component("adapter", "lora", {"rank": 4})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapter.attach(model):
            p.normal_(0.0, 0.2)
    adapter.save(tmp_path / "k.safetensors", "kohya")
    base = ["--base", str(tmp_path / "f2"), *flags]
    assert main(["convert", str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "p.safetensors"), *base]) == 0
    assert main(["convert", str(tmp_path / "p.safetensors"), "-o", str(tmp_path / "k2.safetensors"), *base]) == 0
    _same(tmp_path / "k.safetensors", tmp_path / "k2.safetensors")
    assert main(["convert", str(tmp_path / "f2"), "-o", str(tmp_path / "f2.safetensors"), *flags]) == 0
    assert [(c.name, c.layout) for c in detect(probe(tmp_path / "f2.safetensors"))] == [("flux2", "original")]
    assert main(["convert", str(tmp_path / "f2.safetensors"), "-o", str(tmp_path / "back"), *flags]) == 0
    _same(tmp_path / "f2" / "transformer" / "diffusion_pytorch_model.safetensors", tmp_path / "back" / "diffusion_pytorch_model.safetensors")
