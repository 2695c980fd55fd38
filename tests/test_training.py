"""The training loop end to end on CPU: output layout, exact resume, crash safety, NaN stop."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffcore.config.job import structure_job
from diffcore.errors import TrainingError, UserError
from diffcore.training import run_job
from tests.jobs import tiny_job


def train(job_dict, resume=False):
    return run_job(structure_job(job_dict), resume=resume)


def weights(path):
    return load_file(str(path))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_output_layout_metrics_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    result = train(tiny_job(out))
    assert result.steps == 4
    assert (out / "job.yaml").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "lr", "samples_per_sec", "elapsed_s"} <= r.keys()
        assert r["loss"] > 0 and r["samples_per_sec"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    for step in ("step-2", "step-4"):
        folder = out / "checkpoints" / step
        assert (folder / "model.safetensors").is_file()
        assert json.loads((folder / "trainer.json").read_text())["step"] == int(step[5:])
    final = weights(out / "final" / "model.safetensors")
    assert_same(final, weights(out / "checkpoints" / "step-4" / "model.safetensors"))
    # the third-party callback ran through the callback hook
    assert len((out / "loss_history.txt").read_text().splitlines()) == 4
    # the resolved job is loadable as a job again
    import yaml

    again = structure_job(yaml.safe_load((out / "job.yaml").read_text()))
    assert again.model.config.width == 16


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    train(tiny_job(straight, train={"steps": 6, "checkpoint_every": 3}))
    split = tmp_path / "split"
    train(tiny_job(split, train={"steps": 3, "checkpoint_every": 3}))
    train(tiny_job(split, train={"steps": 6, "checkpoint_every": 3}), resume=True)
    assert_same(weights(straight / "final/model.safetensors"), weights(split / "final/model.safetensors"))
    # byte for byte, headers included (metadata is written in sorted key order)
    assert (straight / "final/model.safetensors").read_bytes() == (split / "final/model.safetensors").read_bytes()
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    sa = json.loads((straight / "checkpoints/step-6/trainer.json").read_text())
    sb = json.loads((split / "checkpoints/step-6/trainer.json").read_text())
    assert sa["sampler"] == sb["sampler"]
    # optimizer (Adam moments, step) and lr-scheduler state are equal too
    state_a = torch.load(straight / "checkpoints/step-6/deepspeed/mp_rank_00_model_states.pt", weights_only=True)
    state_b = torch.load(split / "checkpoints/step-6/deepspeed/mp_rank_00_model_states.pt", weights_only=True)
    assert state_a["lr_scheduler"] == state_b["lr_scheduler"]
    assert state_a["global_steps"] == state_b["global_steps"] == 6
    opt_a, opt_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    for key in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(opt_a[key][name]), torch.as_tensor(opt_b[key][name])), name


def test_existing_checkpoints_need_resume(tmp_path):
    out = tmp_path / "run"
    train(tiny_job(out, train={"steps": 2}))
    with pytest.raises(UserError) as err:
        train(tiny_job(out, train={"steps": 2}))
    assert "pass --resume" in err.value.render()


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from diffcore.training import checkpoint as ckpt

    out = tmp_path / "run"
    real_export = ckpt.export_weights
    calls = {"n": 0}

    def crashing_export(ctx, folder):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            (folder / "model.safetensors").write_bytes(b"torn")
            raise KeyboardInterrupt("killed while saving")
        return real_export(ctx, folder)

    monkeypatch.setattr(ckpt, "export_weights", crashing_export)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_job(out, train={"steps": 6, "checkpoint_every": 2}))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".tmp-step-4", "step-2"]
    previous = out / "checkpoints/step-2"
    assert ckpt.latest_checkpoint(out) == previous
    load_file(str(previous / "model.safetensors"))  # intact and readable

    monkeypatch.setattr(ckpt, "export_weights", real_export)
    train(tiny_job(out, train={"steps": 6, "checkpoint_every": 2}), resume=True)
    assert not (out / "checkpoints/.tmp-step-4").exists()
    straight = tmp_path / "straight"
    train(tiny_job(straight, train={"steps": 6, "checkpoint_every": 2}))
    assert_same(weights(straight / "final/model.safetensors"), weights(out / "final/model.safetensors"))


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    from diffcore.methods.diffusion import DiffusionMethod

    out = tmp_path / "run"
    real = DiffusionMethod.loss

    def poisoned(self, ctx, batch):
        loss, logs = real(self, ctx, batch)
        return (loss * float("nan") if ctx.step == 2 else loss), logs

    monkeypatch.setattr(DiffusionMethod, "loss", poisoned)
    with pytest.raises(TrainingError) as err:
        train(tiny_job(out, train={"steps": 6, "checkpoint_every": 2}))
    message = str(err.value)
    assert "loss became nan at step 3" in message
    assert "step-2" in message
    assert ckpt_names(out) == ["step-2"]


def ckpt_names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_keep_last_prunes(tmp_path):
    out = tmp_path / "run"
    train(tiny_job(out, train={"steps": 5, "checkpoint_every": 1, "keep_last": 2}))
    assert ckpt_names(out) == ["step-4", "step-5"]


def test_gradient_accumulation_and_ema(tmp_path):
    out = tmp_path / "run"
    train(tiny_job(out, train={"steps": 2, "gradient_accumulation": 2, "ema_decay": 0.9}))
    ema = weights(out / "final/ema.safetensors")
    model = weights(out / "final/model.safetensors")
    assert ema.keys() == model.keys()
    assert any(not torch.equal(ema[k], model[k]) for k in ema)
    state = json.loads((out / "checkpoints/step-2/trainer.json").read_text())
    assert state["sampler"]["position"] == 4  # two micro-batches per step


def test_training_from_the_latent_cache(tmp_path, monkeypatch):
    """A folder dataset with cache_dir: the first run fills the cache, a second run reads it and
    never encodes an image again, and both train on the same values."""
    from PIL import Image

    for label, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        folder = tmp_path / "images" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 64), tuple(min(255, c + 10 * i) for c in colour)).save(folder / f"{i}.png")
    data = {"type": "folder", "path": str(tmp_path / "images"), "resolution": 64, "cache_dir": str(tmp_path / "cache")}
    model = {"type": "example-tiny", "width": 16, "num_classes": 2}
    def job(out):
        j = tiny_job(out, model=model, method={"type": "diffusion"}, train={"steps": 2})
        j["data"] = data
        return j

    first = tmp_path / "first"
    train(job(first))
    assert any((tmp_path / "cache" / "latents").glob("*.safetensors"))

    from diffcore_example.model import TinyModel

    def no_encoding(self, pixels):
        raise AssertionError("the cache is complete: nothing may be encoded")

    monkeypatch.setattr(TinyModel, "encode_images", no_encoding)
    second = tmp_path / "second"
    train(job(second))
    assert_same(weights(first / "final/model.safetensors"), weights(second / "final/model.safetensors"))


def test_sampling_callbacks_write_images_and_quality(tmp_path):
    out = tmp_path / "run"
    callbacks = [
        {"type": "progress", "enabled": False},
        {"type": "sample", "every": 2, "labels": [0, 3], "count": 2, "steps": 4, "sampler": "ddim", "guidance": 2.0},
        {"type": "class_agreement", "per_class": 2, "steps": 4},
    ]
    train(tiny_job(out, callbacks=callbacks, train={"steps": 2, "ema_decay": 0.9}))
    pngs = sorted(p.name for p in (out / "samples" / "step-2").iterdir())
    assert pngs == ["grid.png", "sample-000-label0-seed0.png", "sample-001-label0-seed1.png",
                    "sample-002-label3-seed2.png", "sample-003-label3-seed3.png"]
    from PIL import Image

    made = Image.open(out / "samples" / "step-2" / "sample-002-label3-seed2.png").text
    assert {k: made[k] for k in ("label", "seed", "sampler", "steps", "guidance", "step")} == {
        "label": "3", "seed": "2", "sampler": "ddim", "steps": "4", "guidance": "2.0", "step": "2"}

    assert Image.open(next((out / "samples" / "step-2").glob("sample-000*.png"))).size == (8, 8)
    quality = json.loads((out / "quality.json").read_text())
    assert quality["samples"] == 8 and 0.0 <= quality["class_agreement"] <= 1.0
    assert (out / "samples" / "final" / "grid-red-circle.png").is_file()


@pytest.mark.parametrize(
    "train_options",
    [
        {"mixed_precision": "bf16"},
        {"mixed_precision": "fp16"},
        {"deepspeed": {"zero_stage": 1}},
        {"deepspeed": {"zero_stage": 3}},
        {"deepspeed": {"zero_stage": 2, "offload_optimizer": True}},
    ],
    ids=["bf16", "fp16", "zero1", "zero3", "zero2-offload"],
)
def test_precisions_and_zero_stages_train_and_resume(tmp_path, train_options):
    if train_options.get("mixed_precision") == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            pytest.skip("DeepSpeed's CPU accelerator reports no fp16 support on this CPU model")
    out = tmp_path / "run"
    first = train(tiny_job(out, train={"steps": 2, **train_options}))
    assert first.last_loss is not None and first.last_loss == first.last_loss  # finite, not NaN
    resumed = train(tiny_job(out, train={"steps": 3, **train_options}), resume=True)
    assert resumed.steps == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    exported = weights(out / "final" / "model.safetensors")
    assert exported and all(torch.isfinite(t.float()).all() for t in exported.values())


def test_sigkill_while_saving_leaves_previous_checkpoint(tmp_path):
    """A real kill (SIGKILL, no cleanup) in the middle of writing a checkpoint."""
    import subprocess
    import sys
    import textwrap

    from diffcore.training import checkpoint as ckpt
    from tests.jobs import write_job

    out = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", tiny_job(out, train={"steps": 6, "checkpoint_every": 2}))
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from diffcore.training import checkpoint as ckpt
        real = ckpt.export_weights
        calls = []
        def dying(ctx, folder):
            calls.append(1)
            if len(calls) == 2:
                (folder / "model.safetensors").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(ctx, folder)
        ckpt.export_weights = dying
        from diffcore.cli import main
        sys.exit(main(["run", {str(job)!r}]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-2"
    load_file(str(out / "checkpoints" / "step-2" / "model.safetensors"))
    resumed = train(tiny_job(out, train={"steps": 6, "checkpoint_every": 2}), resume=True)
    assert resumed.steps == 6
    assert ckpt_names(out) == ["step-2", "step-4", "step-6"]


def test_a_child_run_does_not_join_the_parents_single_process_group(tmp_path):
    """After an in-process run, a `diffcore run` subprocess inherits RANK/MASTER_PORT from this one;
    it must set up its own world of one instead of knocking on this process's port."""
    import os
    import subprocess
    import sys

    from tests.jobs import write_job

    train(tiny_job(tmp_path / "parent", train={"steps": 1}))
    assert os.environ.get("WORLD_SIZE") == "1"
    job = write_job(tmp_path / "child.yaml", tiny_job(tmp_path / "child", train={"steps": 1}))
    out = subprocess.run([sys.executable, "-m", "diffcore.cli", "run", str(job)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
