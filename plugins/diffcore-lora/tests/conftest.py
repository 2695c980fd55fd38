import sys
from pathlib import Path

import pytest

# the shared tiny models (lora_tiny.py) import by name under any pytest import mode
sys.path.insert(0, str(Path(__file__).parent))

from lora_tiny import TinyModel, TinyNet, TinyTextEncoder  # noqa: E402


@pytest.fixture
def tiny_model() -> TinyModel:
    import torch

    torch.manual_seed(0)
    return TinyModel(TinyNet(), frozen={"te1": TinyTextEncoder()}, latent_channels=4)
