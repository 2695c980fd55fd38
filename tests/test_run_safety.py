"""A run's output directory is safe: checkpoints prove themselves, one writer at a time, nothing is
written before the job is valid, and bad places or sizes are one-line errors."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffcore.config.job import structure_job
from diffcore.errors import UserError
from diffcore.training import checkpoint as ckpt
from diffcore.training import run_job
from diffcore.training.run_lock import LOCK
from tests.jobs import tiny_job, write_job

EMA_JOB = {"steps": 4, "checkpoint_every": 2, "keep_last": 3, "ema_decay": 0.9}


def train(job_dict, resume=False):
    return run_job(structure_job(job_dict), resume=resume)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run with an EMA and checkpoints step-2 and step-4 (each test damages a copy)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_job(out, train=EMA_JOB))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: Path) -> None:
    # same size, garbage in the middle: only a checksum notices
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated ema": ("ema.safetensors", _truncate),
    "truncated rng": ("rng-rank0.safetensors", _truncate),
    "truncated deepspeed": ("deepspeed/mp_rank_00_model_states.pt", _truncate),
    "emptied trainer.json": ("trainer.json", lambda p: p.write_text("")),
    "deleted deepspeed folder": ("deepspeed", shutil.rmtree),
    "garbage in ema": ("ema.safetensors", _scramble),
    "deleted ema": ("ema.safetensors", Path.unlink),
    "garbage in deepspeed": ("deepspeed/mp_rank_00_model_states.pt", _scramble),
    "deleted manifest": ("manifest.json", Path.unlink),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(run_copy, case, capsys):
    name, damage = DAMAGE[case]
    damage(run_copy / "checkpoints/step-4" / name)
    chosen = ckpt.resume_checkpoint(run_copy, uses_ema=True, rank=0)
    assert chosen == run_copy / "checkpoints/step-2"
    err = capsys.readouterr().err
    assert "checkpoints/step-4 is damaged" in err and "resuming from step-2" in err
    assert name.split("/")[0] in err


def test_a_missing_ema_is_fine_when_the_job_no_longer_uses_one(run_copy):
    (run_copy / "checkpoints/step-4/ema.safetensors").unlink()
    assert ckpt.resume_checkpoint(run_copy, uses_ema=False, rank=0) == run_copy / "checkpoints/step-4"


def test_intact_checkpoints_are_resumed_from_the_newest(run_copy, capsys):
    assert ckpt.resume_checkpoint(run_copy, uses_ema=True, rank=0) == run_copy / "checkpoints/step-4"
    assert capsys.readouterr().err == ""


def test_when_every_checkpoint_is_damaged_the_run_exits_2_naming_the_files(run_copy):
    _scramble(run_copy / "checkpoints/step-4/ema.safetensors")
    shutil.rmtree(run_copy / "checkpoints/step-2/deepspeed")
    job = write_job(run_copy.parent / "job.yaml", tiny_job(run_copy, train={**EMA_JOB, "steps": 6}))
    proc = subprocess.run([sys.executable, "-m", "diffcore.cli", "run", str(job), "--resume"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("diffcore: error: ") and "every checkpoint is damaged" in last
    assert "step-4: ema.safetensors" in last and "step-2: deepspeed/" in last
    assert "Traceback" not in proc.stderr


def test_resuming_past_a_damaged_checkpoint_ends_byte_identical(run_copy, tmp_path):
    _scramble(run_copy / "checkpoints/step-4/ema.safetensors")
    train(tiny_job(run_copy, train={**EMA_JOB, "steps": 6}), resume=True)
    straight = tmp_path / "straight"
    train(tiny_job(straight, train={**EMA_JOB, "steps": 6}))
    for name in ("model.safetensors", "ema.safetensors"):
        assert (run_copy / "final" / name).read_bytes() == (straight / "final" / name).read_bytes(), name


def test_a_job_now_asking_for_an_ema_the_checkpoint_lacks_is_refused(tmp_path):
    out = tmp_path / "run"
    train(tiny_job(out, train={"steps": 2, "checkpoint_every": 2}))
    with pytest.raises(UserError) as err:
        train(tiny_job(out, train={"steps": 4, "checkpoint_every": 2, "ema_decay": 0.9}), resume=True)
    assert err.value.render() == (
        f"{out / 'checkpoints/step-2'}: the checkpoint has no EMA weights, but the job sets train.ema_decay "
        "(remove train.ema_decay to resume this run, or start a new run to train with an EMA)"
    )


def test_nothing_is_written_before_the_job_is_valid(run_copy):
    before = (run_copy / "job.yaml").read_bytes()
    stale = run_copy / "checkpoints" / ".tmp-step-6"
    stale.mkdir()
    bad = tiny_job(run_copy, train={**EMA_JOB, "steps": 6})
    bad["data"] = {"type": "folder", "path": str(run_copy / "missing"), "resolution": 8}
    with pytest.raises(UserError, match="folder not found"):
        train(bad, resume=True)
    assert (run_copy / "job.yaml").read_bytes() == before
    assert stale.is_dir() and not (run_copy / LOCK).exists()


def test_a_second_run_on_a_live_output_dir_refuses_at_once_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", tiny_job(out, train={"steps": 100000, "checkpoint_every": 2}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "diffcore.cli", "run", str(job)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while ckpt.latest_checkpoint(out) is None:
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        started = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "diffcore.cli", "run", str(job), "--resume"],
                                capture_output=True, text=True, env=env)
        assert time.perf_counter() - started < 30  # refused before loading anything
        assert second.returncode == 2
        assert f"another run is writing to this output_dir (pid {first.pid} on " in second.stderr
        assert first.poll() is None  # the live run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    held = json.loads((out / LOCK).read_text())
    assert held["pid"] == first.pid  # a SIGKILL leaves the file; nobody holds it any more
    rows = len((out / "metrics.jsonl").read_text().splitlines())
    short = write_job(tmp_path / "short.yaml", tiny_job(out, train={"steps": 2 * (rows // 2) + 2, "checkpoint_every": 2}))
    third = subprocess.run([sys.executable, "-m", "diffcore.cli", "run", str(short), "--resume"],
                           capture_output=True, text=True, env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"took over the lock of a run that ended without releasing it (pid {first.pid}" in third.stderr
    assert not (out / LOCK).exists()


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(UserError, match="output_dir is a file, not a folder"):
        train(tiny_job(target))
    with pytest.raises(UserError, match=r"output_dir cannot be created: .*taken is a file"):
        train(tiny_job(target / "run"))
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EROFS, "is on a read-only file system"), (errno.EACCES, "is not writable")],
)
def test_an_output_dir_that_cannot_be_written_is_one_message(tmp_path, monkeypatch, code, words):
    # root can write anywhere and a read-only mount needs privileges: the OS's answer is simulated
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith(LOCK):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    with pytest.raises(UserError) as err:
        train(tiny_job(tmp_path / "run"))
    assert err.value.render().startswith(f"{tmp_path / 'run'}: output_dir {words}")


def test_a_full_disk_while_checkpointing_is_one_message_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "run"
    real = ckpt.save_safetensors
    calls = {"rng": 0}

    def filling(tensors, path, metadata=None):
        if Path(path).name.startswith("rng-"):
            calls["rng"] += 1
            if calls["rng"] == 2:  # the second checkpoint meets a full disk, as safetensors reports it
                raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                      'message: "No space left on device" })')
        return real(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "save_safetensors", filling)
    with pytest.raises(UserError) as err:
        train(tiny_job(out, train={"steps": 6, "checkpoint_every": 2}))
    message = err.value.render()
    assert message.startswith(f"{out / 'checkpoints'}: the disk filled up while writing checkpoint step-4")
    assert "a checkpoint needs about" in message and "previous checkpoint is intact" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert ckpt.checkpoint_damage(out / "checkpoints/step-2", uses_ema=False) == []


def test_a_dataset_smaller_than_one_batch_is_one_message_and_drop_last_false_fills_it(tmp_path):
    small = tiny_job(tmp_path / "run", train={"steps": 2, "batch_size": 8})
    small["data"] = {"type": "synthetic", "resolution": 8, "size": 5}
    with pytest.raises(UserError) as err:
        train(small)
    assert err.value.render() == (
        "$.train.batch_size: the dataset has 5 examples, fewer than one global batch of 8 (batch_size 8 x 1 processes) "
        "(lower train.batch_size, add data, or set train.drop_last: false to fill the batch by repeating examples)"
    )
    assert not (tmp_path / "run" / "job.yaml").exists()
    small["train"]["drop_last"] = False
    result = train(small)
    assert result.steps == 2


def test_fp16_on_a_device_without_it_is_one_message(tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this device supports fp16: the run trains (covered in test_training)")
    with pytest.raises(UserError) as err:
        train(tiny_job(tmp_path / "run", train={"steps": 1, "mixed_precision": "fp16"}))
    message = err.value.render()
    assert message.startswith("$.train.mixed_precision: this device (cpu: ")
    assert "has no fp16 support in DeepSpeed (use mixed_precision: bf16 (or no))" in message
