"""A LoRA on the SDXL and SD1.5 text encoders trains: the conditioning carries gradients."""

from __future__ import annotations

import pytest
import torch
from sdxl_tiny import make_sd15_pipeline, make_sdxl_pipeline

import diffcore
from diffcore.testing import assert_text_encoders_train

pytest.importorskip("diffcore_lora")


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_text_encoder_adapter_trains(tmp_path, family):
    folder = tmp_path / family
    (make_sdxl_pipeline if family == "sdxl" else make_sd15_pipeline)(folder)
    model = diffcore.load_model(family, pretrained=str(folder), autoencoder=False)
    assert len(model.frozen) == (2 if family == "sdxl" else 1)
    adapter = diffcore.build_component("adapter", "lora", {"rank": 2, "text_encoders": True})
    batch = {
        "captions": ["a cat", "a dog"],
        "latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
    }
    assert_text_encoders_train(model, adapter, batch)
