"""Flux LoRA files from diffcore-lora load into diffusers and give the same outputs (kohya and PEFT names)."""

from __future__ import annotations

import pytest
import torch
from _flux_tiny import AXES, write_pipeline
from test_flux_transformer import _inputs, _our_out, _reference_out

import diffcore

pytest.importorskip("diffcore_lora")


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_file_loads_in_diffusers(tmp_path, fmt):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    parts = write_pipeline(tmp_path / "flux", guidance=True)
    model = diffcore.load_model("flux", pretrained=tmp_path / "flux", axes_dim=AXES)
    options = {"rank": 4, "alpha": 2.0}
    if fmt == "kohya":  # diffusers' kohya converter hard-codes the 12B model's linear1 split (3072/12288)
        options["exclude"] = [r"linear1$"]
    adapter = diffcore.build_component("adapter", "lora", options)
    params = adapter.attach(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:  # a trained-looking adapter: both factors non-zero
            p.normal_(0.0, 0.3)
    x = _inputs(True)
    ours = _our_out(model, x)
    adapter.save(tmp_path / "lora.safetensors", fmt)

    reference = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, **parts)
    base = _reference_out(reference.transformer, x)
    reference.load_lora_weights(str(tmp_path / "lora.safetensors"))
    theirs = _reference_out(reference.transformer, x)
    assert (theirs - base).abs().max() > 1e-2  # the LoRA was applied at all
    assert (ours - theirs).abs().max() < 1e-4


def test_text_encoder_names_kohya_te3_for_t5_and_old_te2_files_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from diffcore.weights import Checkpoint

    write_pipeline(tmp_path / "flux", guidance=True)

    def fresh():
        model = diffcore.load_model("flux", pretrained=tmp_path / "flux", axes_dim=AXES)
        adapter = diffcore.build_component("adapter", "lora", {"rank": 2, "text_encoders": True})
        return model, adapter, adapter.attach(model)

    model, adapter, params = fresh()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.3)
    adapter.save(tmp_path / "kohya.safetensors", "kohya")
    saved = load_file(str(tmp_path / "kohya.safetensors"))
    # kohya/ComfyUI: CLIP-L is te1, T5 te3 over the HF T5 module names; nothing under te2
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in saved
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in saved
    assert not [k for k in saved if k.startswith("lora_te2_")]
    # PEFT/diffusers: T5 is the pipeline's text_encoder_2
    peft = adapter.state_dict("peft")
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in peft
    assert not [k for k in peft if k.startswith("text_encoder_3.")]

    # a file from older diffcore named T5 lora_te2_: it still loads, into a job's adapter and for sampling
    old = {k.replace("lora_te3_", "lora_te2_"): v for k, v in saved.items()}
    assert sum(k.startswith("lora_te2_") for k in old) == sum(k.startswith("lora_te3_") for k in saved) > 0
    save_file(old, str(tmp_path / "old.safetensors"), metadata=Checkpoint(tmp_path / "kohya.safetensors").metadata)
    again_model, again, _ = fresh()
    again.load(tmp_path / "old.safetensors")
    loaded = again.state_dict("kohya")
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    from_file_model = diffcore.load_model("flux", pretrained=tmp_path / "flux", axes_dim=AXES)
    stacked = type(adapter).from_file(from_file_model, tmp_path / "old.safetensors")
    assert {t.component for t in stacked.targets} == {"backbone", "te1", "te2"}
    with torch.no_grad():
        want = model.text.encode(["a cat"])
        got = from_file_model.text.encode(["a cat"])
    assert all(torch.equal(a, b) for a, b in zip(want, got))
