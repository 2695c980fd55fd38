import os

import pytest

# DeepSpeed picks the CPU accelerator here; set before anything imports it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees a registry built from what is installed, and its changes do not leak."""
    from diffcore.registry import set_registry

    set_registry(None)
    yield
    set_registry(None)
