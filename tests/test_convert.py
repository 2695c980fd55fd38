"""``diffcore convert`` on a tiny DiT: layouts round-trip bit for bit, --merge equals the adapter
applied, the input is never overwritten, and an unknown file is named for what it holds.

SDXL and Flux.1 round trips live beside their plugins' tiny builders
(plugins/diffcore-sdxl/tests/test_sdxl_convert.py, plugins/diffcore-flux/tests/test_flux_convert.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffcore
from diffcore.cli import main
from diffcore.layouts import LayoutProbe, describe, probe

pytest.importorskip("diffcore_dit")
pytest.importorskip("diffcore_lora")

TINY = dict(hidden_size=32, depth=2, num_heads=2, patch_size=4, in_channels=3, input_size=16, num_classes=4)


def _same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y)
    for key in x:
        assert x[key].dtype == y[key].dtype, key
        assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory):
    """A DiT diffusers folder and a trained-looking LoRA on it (kohya file)."""
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    model = diffcore.load_model("dit", **TINY)
    with torch.no_grad():  # DiT zero-initialises its modulations; make every weight count
        for p in model.backbone.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(root / "base")
    adapter = diffcore.build_component("adapter", "lora", {"rank": 4, "alpha": 2.0})
    params = adapter.attach(model)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.2)
    adapter.save(root / "lora.safetensors", "kohya")
    return root


def test_detection_names_architecture_and_layout(dit: Path, tmp_path: Path) -> None:
    from diffcore.layouts import detect

    assert [(c.kind, c.name, c.layout) for c in detect(probe(dit / "base"))] == [("model", "dit", "diffusers")]
    assert [(c.kind, c.name, c.layout) for c in detect(probe(dit / "lora.safetensors"))] == [
        ("adapter", "lora", "kohya")
    ]
    found = probe(dit / "base")
    assert found.dtype == "float32" and not found.is_file
    assert "x_embedder" not in describe(found) and "pos_embed" in describe(found)


def test_folder_to_single_file_to_folder_is_bit_exact(dit: Path, tmp_path: Path) -> None:
    assert main(["convert", str(dit / "base"), "-o", str(tmp_path / "dit.safetensors")]) == 0
    assert "x_embedder.proj.weight" in load_file(str(tmp_path / "dit.safetensors"))  # facebookresearch names
    assert main(["convert", str(tmp_path / "dit.safetensors"), "-o", str(tmp_path / "back")]) == 0
    _same_tensors(dit / "base" / "diffusion_pytorch_model.safetensors", tmp_path / "back" / "diffusion_pytorch_model.safetensors")
    # and once more to the single file: the same bytes of tensors
    assert main(["convert", str(tmp_path / "back"), "-o", str(tmp_path / "again.safetensors")]) == 0
    _same_tensors(tmp_path / "dit.safetensors", tmp_path / "again.safetensors")


def test_kohya_to_peft_to_kohya_is_bit_exact(dit: Path, tmp_path: Path) -> None:
    base = str(dit / "base")
    assert main(["convert", str(dit / "lora.safetensors"), "-o", str(tmp_path / "peft.safetensors"), "--base", base]) == 0
    peft = load_file(str(tmp_path / "peft.safetensors"))
    # the fused qkv is written as diffusers' three projections
    assert "transformer.transformer_blocks.0.attn1.to_v.lora_B.weight" in peft
    assert not any(k.startswith("lora_unet_") for k in peft)
    assert main(["convert", str(tmp_path / "peft.safetensors"), "-o", str(tmp_path / "kohya.safetensors"), "--base", base]) == 0
    _same_tensors(dit / "lora.safetensors", tmp_path / "kohya.safetensors")


def test_merge_equals_the_adapter_applied_at_strength_one(dit: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert main(["convert", str(dit / "base"), "--merge", str(dit / "lora.safetensors"), "-o", str(out)]) == 0
    assert (out / "config.json").is_file()  # --merge keeps the input's layout unless --to says otherwise
    applied = diffcore.load_model("dit", pretrained=str(dit / "base"))
    diffcore.build_component("adapter", "lora", {}).from_file(applied, dit / "lora.safetensors", 1.0)
    plain = diffcore.load_model("dit", pretrained=str(dit / "base"))
    merged = diffcore.load_model("dit", pretrained=str(out))
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.tensor([0, 3])
    with torch.no_grad():
        want, got, before = applied.predict(x, t, y), merged.predict(x, t, y), plain.predict(x, t, y)
    assert (want - before).abs().max() > 1e-2  # the adapter changes the output at all
    assert (got - want).abs().max() < 1e-5


def test_merge_of_a_missing_file_names_the_flag(dit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(dit / "base"), "--merge", str(tmp_path / "nope.safetensors:0.5"), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--merge" in err and "nope.safetensors'" in err and not (tmp_path / "m").exists()


def test_refuses_to_overwrite_its_input(dit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lora = dit / "lora.safetensors"
    before = lora.read_bytes()
    code = main(["convert", str(lora), "-o", str(lora), "--base", str(dit / "base"), "--force"])
    assert code == 2
    assert "never overwrites its input" in capsys.readouterr().err
    assert lora.read_bytes() == before
    # a folder input is not written into either, and an existing output needs --force
    assert main(["convert", str(dit / "base"), "-o", str(dit / "base" / "x.safetensors")]) == 2
    (tmp_path / "taken.safetensors").write_bytes(b"")
    assert main(["convert", str(dit / "base"), "-o", str(tmp_path / "taken.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(dit / "base"), "-o", str(tmp_path / "taken.safetensors"), "--force"]) == 0
    assert "blocks.0.attn.qkv.weight" in load_file(str(tmp_path / "taken.safetensors"))
    # --force replaces a model folder, never a folder of other things
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["convert", str(dit / "base"), "--to", "diffusers", "-o", str(tmp_path / "mine"), "--force"]) == 2
    assert "not a model folder" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").exists()


def test_unknown_layout_names_what_it_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2), "encoder.layer.1.weight": torch.zeros(2), "head.bias": torch.zeros(1)}, str(file))
    assert main(["convert", str(file), "-o", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "unknown layout" in err and "3 tensors" in err and "encoder (2)" in err and "head (1)" in err
    assert "dit" in err  # what can convert
    assert not (tmp_path / "out.safetensors").exists()


def test_adapter_without_base_says_how_to_give_it(dit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(dit / "lora.safetensors"), "-o", str(tmp_path / "p.safetensors")]) == 2
    assert "--base" in capsys.readouterr().err


def test_a_model_that_cannot_write_layouts_says_so() -> None:
    from diffcore.errors import UserError
    from diffcore.model import DiffusionModel

    model = DiffusionModel(torch.nn.Linear(2, 2), latent_channels=2)
    with pytest.raises(UserError, match="cannot write its published layouts"):
        model.save_pretrained("x", "original")


def test_probe_reads_headers_only(tmp_path: Path) -> None:
    save_file({"a.weight": torch.zeros(3, 2, dtype=torch.bfloat16)}, str(tmp_path / "w.safetensors"), {"k": "v"})
    found = probe(tmp_path / "w.safetensors")
    assert isinstance(found, LayoutProbe)
    assert found.shapes == {"a.weight": (3, 2)} and found.metadata == {"k": "v"} and found.dtype == "bfloat16"


def test_dit_peft_file_gives_diffusers_the_same_output(dit: Path, tmp_path: Path) -> None:
    """The converted PEFT file names diffusers' modules (the fused qkv as attn1.to_q/k/v): injected
    with peft into DiTTransformer2DModel it gives diffcore's output with the kohya file."""
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    import json

    from safetensors import safe_open

    file = tmp_path / "peft.safetensors"
    assert main(["convert", str(dit / "lora.safetensors"), "-o", str(file), "--base", str(dit / "base")]) == 0
    with safe_open(str(file), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    reference = diffusers.DiTTransformer2DModel.from_pretrained(dit / "base").eval()
    plain = diffusers.DiTTransformer2DModel.from_pretrained(dit / "base").eval()
    config = peft.LoraConfig(
        r=meta["transformer.r"], lora_alpha=meta["transformer.lora_alpha"], target_modules=meta["transformer.target_modules"]
    )
    peft.inject_adapter_in_model(config, reference)
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items()}
    assert not peft.set_peft_model_state_dict(reference, state).unexpected_keys
    ours = diffcore.load_model("dit", pretrained=str(dit / "base"))
    diffcore.build_component("adapter", "lora", {}).from_file(ours, dit / "lora.safetensors", 1.0)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10.0, 500.0]), torch.tensor([0, 3])
    with torch.no_grad():
        want = ours.predict(x, t, y)
        theirs = reference(x, timestep=t, class_labels=y).sample
        before = plain(x, timestep=t, class_labels=y).sample
    assert (theirs - before).abs().max() > 1e-2  # peft applied the file at all
    assert (want - theirs).abs().max() < 1e-5
