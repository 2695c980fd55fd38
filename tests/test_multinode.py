"""Multi-node on DeepSpeed, simulated on one machine, and resuming onto another world size.

Every run here is a real multi-process run (gloo over loopback), so the tests are slow-marked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffcore.testing.jobs import run_cli
from tests.jobs import tiny_job, write_job

ROOT = Path(__file__).resolve().parents[1]
# one process with a batch of 4 and two with 2 each differ only in the order of the gradient sums
ATOL = 2e-5


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def job_file(tmp_path, name, **train):
    job = tiny_job(tmp_path / name, train={"lr": 0.001, "deepspeed": {"zero_stage": 2}, **train})
    job["callbacks"] = [{"type": "progress", "enabled": False}]
    return write_job(tmp_path / f"{name}-{train.get('steps')}.yaml", job)


def run(args, check=True):
    out = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def one(job, *extra):
    return run([sys.executable, "-m", "diffcore.cli", "run", str(job), *extra])


def two(job, *extra):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "diffcore.cli", "run", str(job), *extra])


def final(out_dir):
    return load_file(str(out_dir / "final/model.safetensors"))


def losses(out_dir):
    return [json.loads(x)["loss"] for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)
    # the figure the closing note quotes (pytest -s shows it)
    print(f"largest weight difference: {max(float((a[k] - b[k]).abs().max()) for k in a):.2e}")


@pytest.mark.slow
def test_two_simulated_nodes_match_one_process_with_the_doubled_batch(tmp_path):
    """Two torchrun agents with --nnodes 2 and one process each, meeting over a c10d rendezvous on
    loopback: what a hostfile-free two-node run does."""
    one(job_file(tmp_path, "single", steps=3, batch_size=4, checkpoint_every=0))
    job = job_file(tmp_path, "nodes", steps=3, batch_size=2, checkpoint_every=3)
    port = free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "diffcore-test",
             "--node-rank", str(node), "-m", "diffcore.cli", "run", str(job)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        )
        for node in range(2)
    ]
    outputs = [a.communicate(timeout=600) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[1][-3000:] for o in outputs)
    assert_close(final(tmp_path / "single"), final(tmp_path / "nodes"))
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "nodes"), rel=1e-5)
    # only global rank 0 wrote the run's files: one metrics row per step, one trained line
    assert [json.loads(x)["step"] for x in (tmp_path / "nodes/metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sum("diffcore: trained 3 steps" in o[0] for o in outputs) == 1
    assert sorted(p.name for p in (tmp_path / "nodes/checkpoints/step-3").glob("rng-rank*")) == [
        "rng-rank0.safetensors", "rng-rank1.safetensors"]


@pytest.mark.slow
def test_resume_onto_another_world_size_under_zero2(tmp_path):
    """2 -> 1 and 1 -> 2 processes, the global batch kept (batch_size doubled or halved): the DeepSpeed
    state goes through DeepSpeed's universal checkpoint, and the result matches the straight run to
    the tolerance of a different summation order."""
    two(job_file(tmp_path, "straight", steps=4, batch_size=2, checkpoint_every=2))
    # 2 -> 1
    two(job_file(tmp_path, "down", steps=2, batch_size=2, checkpoint_every=2))
    one(job_file(tmp_path, "down", steps=4, batch_size=4, checkpoint_every=2), "--resume")
    # 1 -> 2
    one(job_file(tmp_path, "up", steps=2, batch_size=4, checkpoint_every=2))
    two(job_file(tmp_path, "up", steps=4, batch_size=2, checkpoint_every=2), "--resume")
    straight = final(tmp_path / "straight")
    for name in ("down", "up"):
        assert_close(straight, final(tmp_path / name))
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
        assert [json.loads(x)["step"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][-2:] == [3, 4]
    # the conversion's work folder is gone; the training moved the weights
    assert not list((tmp_path / "down").glob(".reshard-*"))
    first = load_file(str(tmp_path / "straight/checkpoints/step-2/model.safetensors"))
    assert any(not torch.equal(first[k], straight[k]) for k in straight)


@pytest.mark.slow
def test_a_stuck_rank_ends_the_run_with_a_message_naming_the_rank(tmp_path):
    job = tiny_job(tmp_path / "stuck", train={"steps": 4, "batch_size": 2, "checkpoint_every": 0,
                                               "collective_timeout_s": 5})
    job["callbacks"] = [{"type": "progress", "enabled": False}, {"type": "stall", "rank": 1, "at_step": 2}]
    path = write_job(tmp_path / "stuck.yaml", job)
    out = run_cli("run", str(path), plugins=["tests.stall_plugin"], autoload=True, processes=2,
                  pythonpath=[ROOT], timeout=300)
    assert out.returncode != 0
    assert "diffcore: training stopped: rank 0 of 2 waited more than train.collective_timeout_s=5 s" in out.stderr, \
        out.stderr[-3000:]
