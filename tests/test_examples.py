"""Every example job a user starts from is a valid job (their model files are the user's to give)."""

from pathlib import Path

import pytest

from diffcore.config.job import load_job

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_validates(path):
    job = load_job(path)
    assert job.train.steps > 0
