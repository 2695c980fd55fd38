"""The quickstart job trains a class-conditional DiT whose samples show the class asked for."""

import json
from pathlib import Path

import pytest

from diffcore.config.job import load_job
from diffcore.training import run_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_reaches_class_agreement(tmp_path):
    pytest.importorskip("diffcore_dit")
    job = load_job(ROOT / "examples" / "quickstart.yaml", [f"output_dir={tmp_path / 'quickstart'}"])
    run_job(job)
    quality = json.loads((tmp_path / "quickstart" / "quality.json").read_text())
    assert quality["samples"] == 64
    assert quality["class_agreement"] >= 0.9, quality
    for name in ("red-circle", "green-square", "blue-triangle", "yellow-cross"):
        assert (tmp_path / "quickstart" / "samples" / "final" / f"grid-{name}.png").is_file()
