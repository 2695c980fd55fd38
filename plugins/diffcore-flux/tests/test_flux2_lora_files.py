"""Flux.2 LoRA files from diffcore-lora load into diffusers' Flux2 pipelines (load_lora_weights) with
every key consumed and the same outputs, in the kohya/ComfyUI format (BFL module names) and PEFT's."""

from __future__ import annotations

import pytest
import torch
from _flux2_tiny import model_options, write_pipeline
from safetensors.torch import load_file
from test_flux2_transformer import _inputs, _our_out, _reference_out

import diffcore
from diffcore.testing import assert_outputs_close

pytest.importorskip("diffcore_lora")


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "klein"])
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_file_loads_in_diffusers(tmp_path, fmt, dev):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    parts = write_pipeline(tmp_path / "flux2", dev)
    model = diffcore.load_model("flux2", pretrained=tmp_path / "flux2", **model_options(dev))
    adapter = diffcore.build_component("adapter", "lora", {"rank": 4, "alpha": 2.0})
    params = adapter.attach(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:  # a trained-looking adapter: both factors non-zero
            p.normal_(0.0, 0.3)
    x = _inputs(dev)
    ours = _our_out(model, x)
    adapter.save(tmp_path / "lora.safetensors", fmt)
    keys = set(load_file(str(tmp_path / "lora.safetensors")))
    if fmt == "kohya":  # kohya/ComfyUI names over BFL's module names, alpha always written
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    else:
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
        assert "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_B.weight" in keys

    cls = Flux2Pipeline if dev else Flux2KleinPipeline
    reference = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, **parts)
    base = _reference_out(reference.transformer, x)
    state = cls.lora_state_dict(str(tmp_path / "lora.safetensors"))
    state = state[0] if isinstance(state, tuple) else state
    reference.load_lora_weights(str(tmp_path / "lora.safetensors"))
    theirs = _reference_out(reference.transformer, x)
    # every tensor of the file became a LoRA factor diffusers injected
    injected = {n for n, _ in reference.transformer.named_parameters() if "lora_" in n}
    assert len(injected) == len([k for k in state if "lora_" in k])
    assert (theirs - base).abs().max() > 1e-2  # the LoRA was applied at all
    assert_outputs_close(ours, theirs, atol=1e-4)


def test_default_targets_are_attention_and_mlp(tmp_path):
    write_pipeline(tmp_path / "flux2", dev=False)
    model = diffcore.load_model("flux2", pretrained=tmp_path / "flux2", **model_options(False))
    adapter = diffcore.build_component("adapter", "lora", {"rank": 2})
    adapter.attach(model)
    wrapped = {n.rsplit(".", 1)[0] for n, p in model.backbone.named_parameters() if p.requires_grad}
    wrapped = {n.split(".adapters")[0] for n in wrapped}
    assert "double_blocks.1.txt_mlp.2" in wrapped and "single_blocks.0.linear1" in wrapped
    assert not any("modulation" in n or n.startswith(("img_in", "txt_in", "time_in")) for n in wrapped)
    # the text encoder stays frozen
    assert not any(p.requires_grad for p in model.frozen["te1"].parameters())


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_dora_and_lokr_files(tmp_path, kind):
    """DoRA's PEFT file loads in diffusers' Flux2KleinPipeline with the same output (its kohya file's
    dora_scale is dropped by diffusers, which says so). diffusers' Flux.2 loader converts LoKr only
    under ai-toolkit ``diffusion_model.`` or ``lycoris_`` names, not kohya's ``lora_unet_`` (ComfyUI's),
    so the LoKr file is checked by loading it back into a fresh diffcore model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    parts = write_pipeline(tmp_path / "flux2", False)
    options = model_options(False)
    model = diffcore.load_model("flux2", pretrained=tmp_path / "flux2", **options)
    adapter = diffcore.build_component("adapter", kind, {"rank": 4, "alpha": 2.0})
    params = adapter.attach(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    x = _inputs(False)
    ours = _our_out(model, x)
    adapter.save(tmp_path / "kohya.safetensors", "kohya")
    fresh = diffcore.load_model("flux2", pretrained=tmp_path / "flux2", **options)
    base = _our_out(fresh, x)
    diffcore.build_component("adapter", kind, {}).from_file(fresh, tmp_path / "kohya.safetensors", 1.0)
    assert (ours - base).abs().max() > 1e-2
    assert_outputs_close(_our_out(fresh, x), ours, atol=1e-5)
    if kind == "dora":
        adapter.save(tmp_path / "peft.safetensors", "peft")
        reference = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, **parts)
        reference.load_lora_weights(str(tmp_path / "peft.safetensors"))
        assert_outputs_close(_reference_out(reference.transformer, x), ours, atol=1e-4)
