"""A LoRA on Flux's text encoders (CLIP-L and T5) trains: the conditioning carries gradients."""

from __future__ import annotations

import pytest
import torch
from _flux_tiny import AXES, LATENT_CHANNELS, write_pipeline

import diffcore
from diffcore.testing import assert_text_encoders_train

pytest.importorskip("diffcore_lora")


def test_text_encoder_adapter_trains(tmp_path):
    write_pipeline(tmp_path / "flux", guidance=True)
    model = diffcore.load_model("flux", pretrained=tmp_path / "flux", axes_dim=AXES, max_sequence_length=8)
    adapter = diffcore.build_component("adapter", "lora", {"rank": 2, "text_encoders": True})
    batch = {
        "captions": ["a cat", "a dog"],
        "latents": torch.randn(2, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(0)),
    }
    assert_text_encoders_train(model, adapter, batch)
