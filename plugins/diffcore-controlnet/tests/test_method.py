"""The method's own choices: control dropout, the control image's preparation, section problems."""

from __future__ import annotations

from typing import Any

import torch
from diffcore_controlnet.config import ControlNetConfig
from diffcore_controlnet.method import ControlNetMethod

from diffcore.testing import fake_context


def _dropped(rate: float, micro_step: int = 0) -> torch.Tensor:
    """Which of 64 examples ``loss`` hands on with a blank control image."""
    method = ControlNetMethod(ControlNetConfig(control_dropout=rate))
    seen: dict[str, Any] = {}

    def capture(ctx: Any, batch: Any) -> torch.Tensor:
        seen.update(batch)
        return torch.zeros(())

    method.denoising_loss = capture  # type: ignore[method-assign]
    control = torch.rand(64, 3, 4, 4) * 0.5  # never black
    method.loss(fake_context(micro_step=micro_step), {"control": control})
    blank = (seen["control"] == -1).flatten(1).all(1)
    kept = torch.equal(seen["control"][~blank], control[~blank])
    assert kept, "examples that keep their control keep it unchanged"
    return blank


def test_control_dropout_blanks_that_share_of_examples_reproducibly() -> None:
    assert not _dropped(0.0).any()
    assert _dropped(1.0).all()
    half = _dropped(0.5)
    assert 16 < int(half.sum()) < 48
    assert torch.equal(half, _dropped(0.5))  # drawn through step_random: the same on resume and every rank
    assert not torch.equal(half, _dropped(0.5, micro_step=1))


def test_section_problems_name_their_paths(tmp_path) -> None:
    config = ControlNetConfig(
        control_dropout=1.5,
        conditioning_scale=-1.0,
        conditioning_embedding_out_channels=[],
        num_layers=-1,
        pretrained=str(tmp_path),
    )
    paths = [p.path for p in ControlNetMethod(config).validate(None)]
    assert paths == [
        "$.method.control_dropout",
        "$.method.conditioning_scale",
        "$.method.conditioning_embedding_out_channels",
        "$.method.num_layers",
        "$.method.pretrained",
    ]
    assert ControlNetMethod(ControlNetConfig()).validate(None) == []
