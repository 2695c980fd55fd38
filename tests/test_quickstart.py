"""The quickstart job trains a class-conditional DiT whose samples show the class asked for."""

import json
from pathlib import Path

import pytest

from diffcore.config.job import load_job
from diffcore.training import run_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_draws_the_class_asked_for_in_colour_and_form(tmp_path):
    pytest.importorskip("diffcore_dit")
    job = load_job(ROOT / "examples" / "quickstart.yaml", [f"output_dir={tmp_path / 'quickstart'}"])
    run_job(job)
    quality = json.loads((tmp_path / "quickstart" / "quality.json").read_text())
    assert quality["samples"] == 512
    assert quality["weights"] == "ema"
    assert quality["class_agreement"] >= 0.95, quality
    # the stricter figure, the colour and the form of the class asked for (issue 19 asks for 0.9):
    # 0.953 with this job, whose 512 samples give the figure a standard error of about 0.01
    assert quality["class_and_form_agreement"] >= 0.9, quality
    for name in ("red-circle", "green-square", "blue-triangle", "yellow-cross"):
        assert (tmp_path / "quickstart" / "samples" / "final" / f"grid-{name}.png").is_file()
