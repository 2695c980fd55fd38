"""The example plugin as an outsider would ship it: discovered through its entry point and trained
through the `diffcore run` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def diffcore_cmd():
    script = Path(sys.executable).with_name("diffcore")
    return [str(script)] if script.exists() else [sys.executable, "-m", "diffcore.cli"]


def test_registered_through_entry_point():
    out = subprocess.run([*diffcore_cmd(), "plugins", "--json"], capture_output=True, text=True, check=True)
    plugins = {p["distribution"]: p for p in json.loads(out.stdout)["plugins"]}
    assert plugins["diffcore-example"]["registers"] == {"model": ["example-tiny"], "callback": ["loss-history"]}


def test_trains_through_diffcore_run(tmp_path):
    job = {
        "name": "example",
        "output_dir": str(tmp_path / "out"),
        "model": {"type": "example-tiny", "width": 16},
        "scheduler": {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        "data": {"type": "synthetic", "resolution": 8, "size": 32},
        "train": {"steps": 3, "batch_size": 4, "lr": 0.001},
        "callbacks": [{"type": "loss-history"}, {"type": "progress", "enabled": False}],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([*diffcore_cmd(), "run", str(path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    history = (tmp_path / "out" / "loss_history.txt").read_text().splitlines()
    assert [line.split()[0] for line in history] == ["1", "2", "3"]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
