"""Start-up: quiet by default, third-party output with --debug, threads set per process, and a
warning naming the phase when a run stalls."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from diffcore.config.job import structure_job
from diffcore.testing.jobs import cli_command
from diffcore.training import run_job
from diffcore.training.distributed import physical_cores, threads_per_process
from tests.jobs import tiny_job, write_job

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, plugins=()):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DIFFCORE_DEBUG", None)
    return subprocess.run(cli_command(list(args), plugins=plugins, autoload=bool(plugins)), capture_output=True,
                          text=True, env=env, timeout=300)


def test_a_normal_run_prints_only_its_own_lines(tmp_path):
    out = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", tiny_job(out, train={"steps": 2}))
    quiet = cli("run", str(job))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout == f"diffcore: trained 2 steps; weights in {out / 'final' / 'model.safetensors'}\n"
    assert "DeepSpeed" not in quiet.stderr and "deepspeed" not in quiet.stderr.lower()
    # with --debug the third-party lines are not held back (when DeepSpeed prints any on this machine)
    loud = cli("--debug", "run", str(write_job(tmp_path / "again.yaml", tiny_job(tmp_path / "again", train={"steps": 1}))))
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert len(loud.stdout) + len(loud.stderr) >= len(quiet.stdout)


def test_threads_per_process():
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        assert threads_per_process(5, 2) == 5
        assert threads_per_process(None, 1) == physical_cores()
        assert threads_per_process(None, 64) == 1
        os.environ["OMP_NUM_THREADS"] = "3"
        assert threads_per_process(None, 1) == 3
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved


def test_train_num_threads_sets_the_intra_op_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        run_job(structure_job(tiny_job(tmp_path / "run", train={"steps": 1, "num_threads": 1})))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", [0, -2])
def test_num_threads_is_validated(tmp_path, value):
    from diffcore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\$\.train\.num_threads: must be at least 1"):
        structure_job(tiny_job(tmp_path / "run", train={"num_threads": value}))


def test_a_stall_is_reported_with_the_phase(tmp_path):
    job = tiny_job(tmp_path / "run", train={"steps": 3, "stall_warning_s": 1})
    job["callbacks"].append({"type": "stall", "rank": 0, "at_step": 2, "seconds": 4})
    out = cli("run", str(write_job(tmp_path / "job.yaml", job)), plugins=["tests.stall_plugin"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "diffcore: warning: no progress for" in out.stderr
    assert "while the callbacks after step 2 (checkpoint, samples...)" in out.stderr
    assert out.stderr.count("while the callbacks after step 2") == 1  # once per stall


def test_a_failing_start_up_shows_what_was_held_back(tmp_path, monkeypatch, capfd):
    from diffcore.training.phases import captured_output

    monkeypatch.delenv("DIFFCORE_DEBUG", raising=False)
    with pytest.raises(RuntimeError):
        with captured_output():
            os.write(1, b"compiler said why\n")
            raise RuntimeError("op build failed")
    assert "compiler said why" in capfd.readouterr().err
    with captured_output():
        os.write(1, b"routine chatter\n")
    assert "routine chatter" not in "".join(capfd.readouterr())
