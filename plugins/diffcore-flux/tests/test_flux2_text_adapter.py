"""A LoRA on Flux.2's text encoder (the Qwen3 / Mistral LLM) trains: the conditioning carries gradients."""

from __future__ import annotations

import pytest
import torch
from _flux2_tiny import LATENT_CHANNELS, model_options, write_pipeline

import diffcore
from diffcore.testing import assert_text_encoders_train

pytest.importorskip("diffcore_lora")


@pytest.mark.parametrize("dev", [False, True], ids=["klein-qwen3", "dev-mistral"])
def test_text_encoder_adapter_trains(tmp_path, dev):
    write_pipeline(tmp_path / "flux2", dev)
    model = diffcore.load_model("flux2", pretrained=tmp_path / "flux2", **model_options(dev))
    adapter = diffcore.build_component("adapter", "lora", {"rank": 2, "text_encoders": True})
    batch = {
        "captions": ["a cat", "a dog"],
        "latents": torch.randn(2, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(0)),
    }
    assert_text_encoders_train(model, adapter, batch)
