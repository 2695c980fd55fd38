"""Safe interrupts: SIGTERM and Ctrl-C stop at a step boundary with a checkpoint; a second Ctrl-C
aborts at once; metrics.jsonl never repeats steps after a resume."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from diffcore.config.job import structure_job
from diffcore.testing.jobs import cli_command
from diffcore.training import checkpoint as ckpt
from diffcore.training import run_job
from tests.jobs import tiny_job, write_job

ROOT = Path(__file__).resolve().parents[1]


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def start(job: Path, plugins=()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cli_command(["run", str(job)], plugins=plugins, autoload=bool(plugins)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.time() + 120
    while len(steps_logged(out)) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not reach the step"
        time.sleep(0.1)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", tiny_job(out, train={"steps": 100000, "checkpoint_every": 0}))
    proc = start(job)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = steps_logged(out)[-1]
    path = out / "checkpoints" / f"step-{stopped}"
    assert f"diffcore: stopped by SIGTERM at step {stopped} of 100000; checkpoint {path}; " \
           f"resume with: diffcore run {job} --resume" in err
    assert "Traceback" not in err
    assert ckpt.checkpoint_damage(path, uses_ema=False) == []
    # the resumed run continues from there, and the metrics have every step once
    run_job(structure_job(tiny_job(out, train={"steps": stopped + 2, "checkpoint_every": 0})), resume=True)
    assert steps_logged(out) == list(range(1, stopped + 3))


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    job = tiny_job(out, train={"steps": 100000, "checkpoint_every": 0})
    # rank 0 spends a minute in a callback at step 3: the first Ctrl-C waits for the step to end
    job["callbacks"].append({"type": "stall", "rank": 0, "at_step": 3, "seconds": 60})
    proc = start(write_job(tmp_path / "job.yaml", job), plugins=["tests.stall_plugin"])
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    started = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.perf_counter() - started < 20
    assert proc.returncode == 130, err[-3000:]
    assert "SIGINT: finishing this step" in err and "SIGINT again: aborting now, without a checkpoint" in err
    assert ckpt.latest_checkpoint(out) is None


def test_metrics_continue_from_the_checkpoint_without_repeating_steps(tmp_path):
    """A run killed after logging steps its last checkpoint does not hold logs them again on resume."""
    out = tmp_path / "run"
    run_job(structure_job(tiny_job(out, train={"steps": 4, "checkpoint_every": 2})))
    shutil.rmtree(out / "checkpoints" / "step-4")  # as if killed between logging step 4 and saving it
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # and a row torn mid-write
    run_job(structure_job(tiny_job(out, train={"steps": 6, "checkpoint_every": 2})), resume=True)
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
