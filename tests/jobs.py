"""A tiny job the kernel tests train: the example plugin's model on synthetic shapes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

TINY_JOB: dict[str, Any] = {
    "name": "tiny",
    "seed": 7,
    "model": {"type": "example-tiny", "width": 16, "num_classes": 4},
    "scheduler": {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "method": {"type": "diffusion", "condition_dropout": 0.2},
    "data": {"type": "synthetic", "resolution": 8, "size": 64},
    "train": {
        "steps": 4,
        "batch_size": 4,
        "lr": 0.001,
        "checkpoint_every": 2,
        "keep_last": 3,
        "grad_clip": 1.0,
    },
    "callbacks": [{"type": "progress", "enabled": False}, {"type": "loss-history"}],
}


def tiny_job(output_dir: Path, **sections: Any) -> dict[str, Any]:
    job = copy.deepcopy(TINY_JOB)
    job["output_dir"] = str(output_dir)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key].update(value)
        else:
            job[key] = value
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job))
    return path
