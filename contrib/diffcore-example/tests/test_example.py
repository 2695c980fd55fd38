"""The example plugin as an outsider would ship it: discovered through its entry point and trained
through the `diffcore run` command, tested with diffcore.testing."""

import json

from diffcore.testing import assert_entry_points_light, run_cli, run_job


def test_registered_through_entry_point():
    out = run_cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    plugins = {p["distribution"]: p for p in json.loads(out.stdout)["plugins"]}
    assert plugins["diffcore-example"]["registers"] == {"model": ["example-tiny"], "callback": ["loss-history"]}


def test_entry_module_imports_no_torch():
    assert assert_entry_points_light("diffcore-example") == ["diffcore_example.plugin"]


def test_trains_through_diffcore_run(tmp_path):
    job = {
        "name": "example",
        "model": {"type": "example-tiny", "width": 16},
        "scheduler": {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        "data": {"type": "synthetic", "resolution": 8, "size": 32},
        "train": {"steps": 3, "batch_size": 4, "lr": 0.001},
        "callbacks": [{"type": "loss-history"}, {"type": "progress", "enabled": False}],
    }
    run = run_job(job, tmp_path / "out", spawn=True, env={"DS_ACCELERATOR": "cpu"})
    history = (run.output_dir / "loss_history.txt").read_text().splitlines()
    assert [line.split()[0] for line in history] == ["1", "2", "3"]
    assert (run.output_dir / "final" / "model.safetensors").is_file()
    assert [row["step"] for row in run.metrics] == [1, 2, 3]
