"""`diffcore doctor` (the preflight) and the cheap checks `diffcore validate` runs before a start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.jobs import tiny_job, write_job


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diffcore.cli", *args], capture_output=True, text=True)


def draw(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def folder_job(tmp_path: Path, **data: object) -> Path:
    images = tmp_path / "images"
    for i, (w, h) in enumerate([(16, 16), (24, 16), (20, 30)]):
        draw(images / f"{i}.png", w, h, seed=i)
        (images / f"{i}.txt").write_text(f"caption {i}")
    job = tiny_job(tmp_path / "out")
    job["model"] = {"type": "example-tiny", "width": 16}
    job["data"] = {"type": "folder", "path": str(images), "resolution": 16, **data}
    return write_job(tmp_path / "job.yaml", job)


def test_validate_finds_a_resolution_that_makes_no_bucket(tmp_path):
    out = run_cli("validate", str(folder_job(tmp_path)))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "$.data.bucket_step: resolution 16 and bucket_step 64 do not make a bucket" in out.stderr
    assert "set bucket_step between 8 and 16, or buckets: false" in out.stderr
    assert "Traceback" not in out.stderr


def test_without_buckets_the_bucket_step_does_not_matter(tmp_path):
    job = folder_job(tmp_path, buckets=False)
    out = run_cli("validate", str(job))
    assert out.returncode == 0, out.stderr
    from diffcore.api import build_component

    dataset = build_component("dataset", "folder", {"path": str(tmp_path / "images"), "resolution": 16, "buckets": False})
    assert len(dataset) == 3 and {dataset.bucket(i) for i in range(3)} == {(16, 16)}
    assert tuple(dataset[1]["pixels"].shape) == (3, 16, 16)


def test_validate_names_a_missing_data_folder_in_a_mix(tmp_path):
    job = tiny_job(tmp_path / "out")
    job["data"] = {"type": "mix", "datasets": [{"type": "synthetic"}, {"type": "folder", "path": str(tmp_path / "gone")}]}
    out = run_cli("validate", str(write_job(tmp_path / "job.yaml", job)))
    assert out.returncode == 2
    assert f"$.data.datasets[1].path: folder not found: {tmp_path / 'gone'}" in out.stderr
