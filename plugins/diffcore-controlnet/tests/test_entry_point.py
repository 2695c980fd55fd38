"""Discovery stays cheap: the entry module of diffcore-controlnet imports no torch, deepspeed or transformers."""

from __future__ import annotations

from diffcore.testing import assert_entry_points_light


def test_entry_point_imports_no_torch() -> None:
    assert assert_entry_points_light("diffcore-controlnet") == ["diffcore_controlnet.plugin"]
