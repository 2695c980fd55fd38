"""Discovery stays cheap, and both model names are registered with their configs."""

from __future__ import annotations

import pytest

import diffcore
from diffcore.errors import UserError
from diffcore.testing import TinyModel, assert_entry_points_light


def test_entry_point_imports_no_torch() -> None:
    assert assert_entry_points_light("diffcore-sd3") == ["diffcore_sd3.plugin"]


def test_skip_layers_on_a_model_that_cannot_skip_is_a_user_error() -> None:
    import torch

    from diffcore.sampling import generate

    model = TinyModel()
    assert not model.layer_skipping
    scheduler = diffcore.load_scheduler(**model.default_scheduler)
    batch = {"labels": torch.tensor([0])}
    with pytest.raises(UserError, match="cannot pass blocks over") as info:
        generate(model, scheduler, batch=batch, height=8, width=8, steps=2, sampler_options={"skip_layers": [0]})
    assert "skip_layers" in str(info.value.where)
