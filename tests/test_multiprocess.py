"""Two CPU processes under torchrun with ZeRO-2 match one process with the doubled micro-batch."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.jobs import tiny_job, write_job


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, env_extra=None):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env_extra or {}))
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_process_zero2_matches_one_process(tmp_path):
    common = {"steps": 3, "checkpoint_every": 0, "lr": 0.001}
    one = tiny_job(tmp_path / "one", train={**common, "batch_size": 4, "deepspeed": {"zero_stage": 2}})
    two = tiny_job(tmp_path / "two", train={**common, "batch_size": 2, "deepspeed": {"zero_stage": 2}})
    run([sys.executable, "-m", "diffcore.cli", "run", str(write_job(tmp_path / "one.yaml", one))])
    run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "diffcore.cli", "run", str(write_job(tmp_path / "two.yaml", two)),
        ]
    )
    a = load_file(str(tmp_path / "one/final/model.safetensors"))
    b = load_file(str(tmp_path / "two/final/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=k)
    # and training moved the weights (the comparison is not between two untouched inits)
    import json

    losses_one = [json.loads(x)["loss"] for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    losses_two = [json.loads(x)["loss"] for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert losses_one == pytest.approx(losses_two, rel=1e-5)
