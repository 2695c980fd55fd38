"""An adapter that trains text encoders is refused beside a feature cache, before any model loads:
the cache holds the frozen encoders' outputs, so their adapter layers would never learn."""

from __future__ import annotations

import json

import diffcore_dit.plugin
import diffcore_lora.plugin
import pytest
from PIL import Image

from diffcore import Problem
from diffcore.config.job import structure_job
from diffcore.job_checks import job_problems
from diffcore.testing import plugins_registered, run_cli

SAYS = (
    "the adapter trains text encoders ($.adapter.text_encoders: {}), whose outputs a feature cache would "
    "freeze; remove cache_dir, or set text_encoders: false"
)


@pytest.fixture(autouse=True)
def registered():
    with plugins_registered(diffcore_dit.plugin, diffcore_lora.plugin):
        yield


def job(tmp_path, adapter: dict, cache: bool) -> dict:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a picture {i}")
    data = {"type": "folder", "path": str(images), "resolution": 16, "bucket_step": 8}
    if cache:
        data["cache_dir"] = str(tmp_path / "cache")
    return {"output_dir": str(tmp_path / "out"),
            "model": {"type": "dit", "hidden_size": 32, "depth": 2, "num_heads": 2, "input_size": 16},
            "method": {"type": "diffusion"}, "data": data, "adapter": adapter,
            "train": {"batch_size": 2, "steps": 1}}  # fmt: skip


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
@pytest.mark.parametrize("text_encoders", [True, ["te1"]])
def test_text_encoders_with_a_cache_are_refused(tmp_path, kind, text_encoders) -> None:
    found = job_problems(structure_job(job(tmp_path, {"type": kind, "text_encoders": text_encoders}, cache=True)))
    assert found == [Problem("$.data.cache_dir", SAYS.format(text_encoders))]


@pytest.mark.parametrize(("text_encoders", "cache"), [(False, True), (True, False)])
def test_either_alone_is_fine(tmp_path, text_encoders, cache) -> None:
    assert job_problems(structure_job(job(tmp_path, {"type": "lora", "text_encoders": text_encoders}, cache))) == []


def test_diffcore_validate_exits_2_naming_the_cache(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job(tmp_path, {"type": "lora", "text_encoders": True}, cache=True)))
    result = run_cli("validate", str(path), plugins=["diffcore_dit.plugin", "diffcore_lora.plugin"])
    assert result.returncode == 2, result.stderr
    assert "$.data.cache_dir" in result.stderr and "remove cache_dir, or set text_encoders: false" in result.stderr
