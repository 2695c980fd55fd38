"""A LoRA on SD3's text encoders (CLIP-L, CLIP-G and T5) trains: the conditioning carries gradients."""

from __future__ import annotations

import pytest
import torch
from _sd3_tiny import LATENT_CHANNELS, write_pipeline

import diffcore
from diffcore.testing import assert_text_encoders_train

pytest.importorskip("diffcore_lora")


def test_text_encoder_adapter_trains(tmp_path):
    write_pipeline(tmp_path / "sd35")
    model = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "sd35", max_sequence_length=8)
    adapter = diffcore.build_component("adapter", "lora", {"rank": 2, "text_encoders": True})
    batch = {
        "captions": ["a cat", "a dog"],
        "latents": torch.randn(2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0)),
    }
    assert_text_encoders_train(model, adapter, batch)
