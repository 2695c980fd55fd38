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
