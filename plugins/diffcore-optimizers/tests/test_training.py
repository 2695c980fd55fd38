"""Each optimizer trains the quickstart's kind of model (a class-conditional flow DiT on the synthetic
shapes, made tiny) through DeepSpeed, and resumes bit-exactly; schedule-free evaluates, checkpoints
and exports at its averaged point."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import attrs
import diffcore_dit.plugin
import diffcore_optimizers.plugin
import pytest
import torch
from diffcore_optimizers.config import ScheduleFreeAdamWConfig
from safetensors.torch import load_file

import diffcore
from diffcore import ConfigError, UserError
from diffcore.testing import fake_context, run_job

PLUGINS = [diffcore_dit.plugin, diffcore_optimizers.plugin]
STEPS, HALF = 24, 12
#: each run's mean loss over its last 6 steps is at most this share of the mean over its first 6
#: (measured here: 0.72-0.79, Adafactor the highest; the flow loss starts near 1.6)
LOSS_FALLS_TO = 0.85
#: train.lr and extra keys per optimizer: each library's usual scale for this small model
SETTINGS: dict[str, tuple[float, dict[str, Any]]] = {
    "adamw8bit": (2e-3, {}),
    # a relative step: the DiT's zero-initialised layers move by eps2 * lr until they grow
    "adafactor": (5e-2, {"eps2": 1e-2}),
    # D grows from d0 by a bounded factor per step: from the default 1e-6 24 steps are too few
    "prodigy": (1.0, {"d0": 1e-5}),
    "schedulefree_adamw": (2e-3, {}),
    "lion": (1e-3, {}),
}


def quickstart_job(name: str, steps: int, **train: Any) -> dict[str, Any]:
    lr, extra = SETTINGS[name]
    return {
        "name": f"opt-{name}",
        "seed": 0,
        # examples/quickstart.yaml's model and task, smaller: 16 px, 2 blocks of width 32
        "model": {"type": "dit", "hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "in_channels": 3,
                  "input_size": 16, "num_classes": 4, "prediction_type": "flow"},
        "scheduler": {"type": "flow"},
        "method": {"type": "diffusion", "condition_dropout": 0.1},
        "data": {"type": "synthetic", "resolution": 16, "size": 64},
        "train": {"steps": steps, "batch_size": 8, "lr": lr, "grad_clip": 1.0, "checkpoint_every": HALF,
                  "optimizer": {"type": name, **extra}, **train},
        "callbacks": [{"type": "progress", "enabled": False}],
    }  # fmt: skip


def assert_equal_trees(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_equal_trees(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif type(a).__module__.startswith("deepspeed"):  # its loss scaler: no __eq__, compare its fields
        assert type(a) is type(b), where
        assert_equal_trees(vars(a), vars(b), where)
    else:
        assert a == b, where


def optimizer_state(run_dir: Path, step: int) -> Any:
    state = torch.load(run_dir / f"checkpoints/step-{step}/deepspeed/mp_rank_00_model_states.pt", weights_only=True)
    return state["optimizer"]


#: schedule-free under DeepSpeed's fp32 master partitions too (its two wrappers that copy them back)
MASTER_WEIGHTS = {"zero1-bf16": {"deepspeed": {"zero_stage": 1}, "mixed_precision": "bf16"},
                  "zero2": {"deepspeed": {"zero_stage": 2}}}  # fmt: skip
CASES = [(name, "zero0", {}) for name in SETTINGS]
CASES += [("schedulefree_adamw", key, train) for key, train in MASTER_WEIGHTS.items()]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "setup", "train"), CASES, ids=[f"{n}-{s}" for n, s, _ in CASES])
def test_trains_and_resumes_bit_exactly(tmp_path: Path, name: str, setup: str, train: dict[str, Any]) -> None:
    straight = run_job(quickstart_job(name, STEPS, **train), tmp_path / "straight", plugins=PLUGINS)
    losses = straight.losses
    assert len(losses) == STEPS
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last <= LOSS_FALLS_TO * first, f"{name}: loss {first:.3f} -> {last:.3f}"

    # The first half of a split run writes exactly the straight run's step-12 checkpoint (the same
    # steps, then the same save), so the resumed half starts from a copy of it: N/2 + resume + N/2.
    split = tmp_path / "split"
    shutil.copytree(straight.output_dir / f"checkpoints/step-{HALF}", split / f"checkpoints/step-{HALF}")
    resumed = run_job(quickstart_job(name, STEPS, **train), split, resume=True, plugins=PLUGINS)
    assert resumed.losses == losses[HALF:]
    final_a = load_file(str(straight.output_dir / "final/model.safetensors"))
    final_b = load_file(str(split / "final/model.safetensors"))
    assert_equal_trees(final_a, final_b)
    state = optimizer_state(straight.output_dir, STEPS)
    assert_equal_trees(state, optimizer_state(split, STEPS))
    if setup == "zero0":
        assert state["state"], "the optimizer kept no state"
        if name == "schedulefree_adamw":  # checkpoints hold the evaluation point, as exports do
            assert [g["train_mode"] for g in state["param_groups"]] == [False]
    else:  # the fp32 partitions and their optimizer state, in DeepSpeed's own file
        zero = torch.load(next((split / f"checkpoints/step-{STEPS}/deepspeed").glob("*optim_states.pt")), weights_only=True)
        again = torch.load(next((straight.output_dir / f"checkpoints/step-{STEPS}/deepspeed").glob("*optim_states.pt")), weights_only=True)
        assert_equal_trees(zero["optimizer_state_dict"], again["optimizer_state_dict"])


@pytest.mark.slow
def test_schedulefree_under_zero2_exports_what_zero0_exports(tmp_path: Path) -> None:
    # One process: ZeRO-2's flat fp32 partition steps exactly as the module's own weights do, so the
    # exported evaluation point must be the same bit for bit; without the partition copied back into
    # the module at each switch it would be the training point (1e-3 away here)
    exported = []
    for key, train in {"zero0": {}, "zero2": {"deepspeed": {"zero_stage": 2}}}.items():
        run_job(quickstart_job("schedulefree_adamw", 6, **train), tmp_path / key, plugins=PLUGINS)
        exported.append(load_file(str(tmp_path / key / "final/model.safetensors")))
    assert_equal_trees(*exported)


def test_schedulefree_evaluates_at_its_average() -> None:
    spec = {s.name: s for s in diffcore_optimizers.plugin.diffcore_register_optimizers()}["schedulefree_adamw"]
    ctx = fake_context()
    params = [p for p in ctx.model.backbone.parameters()]
    optimizer = spec.factory(params, ScheduleFreeAdamWConfig(betas=(0.9, 0.999)), 0.05)
    ctx.optimizer_mode = functools.partial(spec.set_mode, optimizer)
    ctx.optimizer_mode(True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    y = [p.detach().clone() for p in params]
    # schedule-free's average x, from the training point y and the base sequence z: y = 0.9 x + 0.1 z
    x = [yi.lerp(optimizer.state[p]["z"], 1 - 1 / 0.9) for yi, p in zip(y, params)]
    assert not all(torch.equal(a, b) for a, b in zip(x, y))
    with ctx.evaluating():
        assert all(torch.equal(p, xi) for p, xi in zip(params, x))
        with ctx.optimizer_evaluating():  # nested: already there, nothing moves
            assert all(torch.equal(p, xi) for p, xi in zip(params, x))
    assert all(torch.allclose(p, yi, atol=1e-6) for p, yi in zip(params, y))
    optimizer.step()  # back in training mode: schedulefree refuses to step otherwise


class Unchecked:
    """schedule-free without its validate: what the loop itself does with such an optimizer."""

    @diffcore.hookimpl
    def diffcore_register_optimizers(self):
        specs = {s.name: s for s in diffcore_optimizers.plugin.diffcore_register_optimizers()}
        return [attrs.evolve(specs["schedulefree_adamw"], name="unchecked_schedulefree", validate=None)]


@pytest.mark.slow
def test_schedulefree_is_refused_where_deepspeed_keeps_master_weights(tmp_path: Path) -> None:
    job = quickstart_job("schedulefree_adamw", 1, deepspeed={"zero_stage": 3})
    with pytest.raises(ConfigError) as err:  # by its validate, before the model loads
        run_job(job, tmp_path / "checked", plugins=PLUGINS)
    assert [p.path for p in err.value.problems] == ["$.train.optimizer.type"]
    # the loop's own check, for an optimizer with set_mode that does not validate: ZeRO-3's wrapper
    # cannot copy its partitions back into the module on demand
    job["train"]["optimizer"]["type"] = "unchecked_schedulefree"
    with pytest.raises(UserError) as err:
        run_job(job, tmp_path / "unchecked", plugins=[*PLUGINS, Unchecked()])
    text = str(err.value)
    assert text.startswith("$.train.optimizer.type: the unchecked_schedulefree optimizer moves the weights")
    assert "DeepSpeed's DeepSpeedZeroOptimizer_Stage3 (ZeRO-3, or mixed precision at ZeRO stage 0)" in text
