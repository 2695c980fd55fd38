"""SD3 LoRA files from diffcore-lora: kohya/ComfyUI names and PEFT names, against diffusers."""

from __future__ import annotations

import re

import pytest
import torch
from _sd3_tiny import LATENT_CHANNELS, write_pipeline

import diffcore

pytest.importorskip("diffcore_lora")

CAPTIONS = ["a cat"]
MAX_LEN = 8
_ADAPTER_NAME = re.compile(r"\.default(_\d+)?(?=\.weight$)")  # PEFT's adapter level in parameter names


def _adapted(root, fmt: str, text_encoders):
    model = diffcore.load_model("sd35", variant="medium", pretrained=root, max_sequence_length=MAX_LEN)
    adapter = diffcore.build_component(
        "adapter", "lora", {"rank": 4, "alpha": 2.0, "text_encoders": text_encoders, "save_format": fmt}
    )
    params = adapter.attach(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:  # a trained-looking adapter: both factors non-zero
            p.normal_(0.0, 0.3)
    return model, adapter


def _velocity(model) -> torch.Tensor:
    latents = torch.randn(1, LATENT_CHANNELS, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.predict(latents, torch.tensor([0.6]), model.encode_conditions({"captions": CAPTIONS}))


def _diffusers_velocity(pipe) -> torch.Tensor:
    latents = torch.randn(1, LATENT_CHANNELS, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_LEN
        )
        return pipe.transformer(
            hidden_states=latents,
            timestep=torch.tensor([600.0]),
            encoder_hidden_states=context,
            pooled_projections=pooled,
        ).sample


def test_peft_file_loads_in_diffusers_with_every_key_consumed(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    parts = write_pipeline(tmp_path / "sd35", "sd35-medium")
    model, adapter = _adapted(tmp_path / "sd35", "peft", ["te1", "te2"])
    ours = _velocity(model)
    adapter.save(tmp_path / "lora.safetensors")
    keys = set(load_file(str(tmp_path / "lora.safetensors")))
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder", "text_encoder_2"}
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight" in keys

    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, **parts)
    base = _diffusers_velocity(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    theirs = _diffusers_velocity(pipe)
    assert (theirs - base).abs().max() > 1e-2  # the LoRA was applied at all
    assert (ours - theirs).abs().max() < 1e-4
    # every file key landed on a LoRA layer of the pipeline
    components = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    loaded = set()
    for prefix, module in components.items():
        for name, _ in module.named_parameters():
            if "lora_" in name:
                loaded.add(prefix + "." + _ADAPTER_NAME.sub("", name))
    assert keys == loaded


def test_kohya_file_uses_comfyui_names(tmp_path):
    from safetensors.torch import load_file

    write_pipeline(tmp_path / "sd35", "sd35-medium")
    model, adapter = _adapted(tmp_path / "sd35", "kohya", True)
    ours = _velocity(model)
    adapter.save(tmp_path / "lora.safetensors")
    tensors = load_file(str(tmp_path / "lora.safetensors"))
    modules = {k.rsplit(".", 2)[0] if k.endswith(("lora_down.weight", "lora_up.weight")) else k.rsplit(".", 1)[0] for k in tensors}
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2", "te3"}
    # ComfyUI maps lora_unet_<original module path with underscores> onto model.diffusion_model.* keys
    native = {n.replace(".", "_") for n, _ in model.backbone.named_modules()}
    assert all(m.removeprefix("lora_unet_") in native for m in modules if m.startswith("lora_unet_"))
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in modules
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in modules
    assert all(m + ".alpha" in tensors for m in modules)  # .alpha always written

    # the file loads back into a fresh diffcore model and gives the same output
    fresh = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "sd35", max_sequence_length=MAX_LEN)
    adapter_type = diffcore.build_component("adapter", "lora", {"rank": 1, "text_encoders": True})
    adapter_type.from_file(fresh, tmp_path / "lora.safetensors", 1.0)
    assert (_velocity(fresh) - ours).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_other_adapter_kinds_wrap_the_fused_layers(tmp_path, kind):
    from safetensors.torch import load_file

    write_pipeline(tmp_path / "sd35", "sd35-medium")
    model = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "sd35", max_sequence_length=MAX_LEN)
    before = _velocity(model)
    adapter = diffcore.build_component("adapter", kind, {"rank": 2, "text_encoders": ["te1"]})
    params = adapter.attach(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    after = _velocity(model)
    assert (after - before).abs().max() > 1e-3
    adapter.save(tmp_path / "a.safetensors")
    keys = load_file(str(tmp_path / "a.safetensors"))
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn2_qkv.") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys)
    fresh = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "sd35", max_sequence_length=MAX_LEN)
    diffcore.build_component("adapter", kind, {"rank": 2, "text_encoders": ["te1"]}).from_file(
        fresh, tmp_path / "a.safetensors", 1.0
    )
    assert (_velocity(fresh) - after).abs().max() < 1e-5
