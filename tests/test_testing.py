"""diffcore.testing: in-process registration, the fake TrainContext, tiny jobs, the import check,
reference comparison and the pytest fixtures."""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import diffcore
from diffcore.context import StepRandom
from diffcore.errors import PluginError
from diffcore.registry import get_registry, set_registry
from diffcore.testing import (
    assert_light_import,
    assert_outputs_close,
    compare_with_reference,
    fake_context,
    first_batch,
    plugins_registered,
    registry_with,
    run_cli,
    run_job,
)
from tests import testing_plugin

ROOT = Path(__file__).resolve().parents[1]

JOB = {
    "seed": 3,
    "model": {"type": "testing-tiny", "width": 8},
    "data": {"type": "synthetic", "resolution": 8, "size": 16},
    "train": {"steps": 2, "batch_size": 4, "lr": 0.001, "checkpoint_every": 2},
    "callbacks": [{"type": "progress", "enabled": False}, {"type": "testing-note"}],
}


class Misspelt:
    @diffcore.hookimpl
    def diffcore_register_model(self):
        return []


def test_plugins_registered_installs_and_restores_the_registry():
    before = registry_with()
    set_registry(before)
    with plugins_registered(testing_plugin) as registry:
        assert get_registry() is registry
        assert "testing-tiny" in registry.names("model")
        assert registry.get("model", "testing-tiny").distribution == "in-process"
        assert "synthetic" in registry.names("dataset")  # the built-ins are there too
    assert get_registry() is before
    assert "testing-tiny" not in before.names("model")


def test_an_invalid_plugin_object_raises_with_the_reason():
    with pytest.raises(PluginError, match="diffcore_register_model'.*did you mean 'diffcore_register_models'"):
        registry_with(Misspelt())


def test_fake_context_draws_like_the_loop_across_ranks():
    ctx = fake_context(seed=5)
    assert ctx.engine is None and ctx.step_random is not None
    assert ctx.trainable == list(ctx.model.backbone.parameters())  # the default method finetunes it all
    batch = first_batch(ctx.dataset, 4)
    loss, logs = ctx.method.loss(ctx, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and logs == {}
    ctx.step_random = StepRandom(5, 0)
    again, _ = ctx.method.loss(ctx, batch)
    assert torch.equal(loss, again)  # the same micro-step draws the same noise and times
    ctx.step_random = StepRandom(5, 1)
    assert not torch.equal(loss, ctx.method.loss(ctx, batch)[0])
    # two ranks with half the batch each draw exactly what one rank draws for the whole batch
    halves = []
    for rank in (0, 1):
        part = fake_context(ctx.model, seed=5, rank=rank, world_size=2)
        rows = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
        halves.append(part.method.loss(part, rows)[0])
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss, rtol=1e-6, atol=0)


def test_run_job_in_process_with_an_in_process_plugin(tmp_path):
    run = run_job(JOB, tmp_path / "out", plugins=[testing_plugin])
    assert [row["step"] for row in run.metrics] == [1, 2]
    assert len(run.losses) == 2 and all(loss > 0 for loss in run.losses)
    assert (run.output_dir / "note.txt").read_text() == "2"
    final = run.weights("model")
    assert final.keys() == run.weights("model", "step-2").keys()
    assert run.job_file.is_file() and "testing-tiny" in run.job_file.read_text()
    # --resume with a --set override continues the same output to step 3
    again = run_job(JOB, tmp_path / "out", plugins=[testing_plugin], resume=True, overrides=["train.steps=3"])
    assert [row["step"] for row in again.metrics] == [1, 2, 3]


def test_run_job_in_a_subprocess_reports_the_exit_status(tmp_path):
    bad = {**JOB, "train": {**JOB["train"], "stpes": 2}}
    run = run_job(bad, tmp_path / "bad", spawn=True, plugins=["tests.testing_plugin"], pythonpath=[ROOT], expect_exit=2)
    assert "$.train.stpes" in run.stderr and "Traceback" not in run.stderr
    with pytest.raises(AssertionError, match="exited 2, expected 0"):
        run_job(bad, tmp_path / "bad2", spawn=True, plugins=["tests.testing_plugin"], pythonpath=[ROOT])


def test_run_cli_registers_plugins_in_the_child():
    out = run_cli("plugins", "--json", plugins=["tests.testing_plugin"], pythonpath=[ROOT])
    assert out.returncode == 0, out.stderr
    plugins = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert plugins["tests.testing_plugin"]["registers"] == {"model": ["testing-tiny"], "callback": ["testing-note"]}


def test_assert_light_import():
    assert_light_import("tests.testing_plugin")
    assert_light_import("diffcore.testing")  # loading the pytest plugin stays cheap
    with pytest.raises(AssertionError, match="imports torch"):
        assert_light_import("diffcore.testing.context")


class Reference(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x):
        return (self.proj(x).tanh(),)  # references often return tuples


class Ours(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x).tanh()


def rename(state):
    return {k.replace("proj.", "linear."): v for k, v in state.items()}


def test_compare_with_reference_on_the_same_random_weights():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    assert compare_with_reference(Ours(), Reference(), (x,), to_ours=rename) == 0.0
    with pytest.raises(AssertionError, match=r"missing 2 \(e.g. linear.weight, linear.bias\)"):
        compare_with_reference(Ours(), Reference(), (x,))
    state = {k: v + 1 for k, v in Reference().state_dict().items()}
    ours = Ours()
    compare_with_reference(ours, Reference(), (x,), state_dict=state, to_ours=rename)
    assert torch.equal(ours.linear.bias, state["proj.bias"])  # the given weights went into both


def test_assert_outputs_close_says_where_and_how_much():
    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[1, 2] = 0.5
    with pytest.raises(AssertionError, match=r"max abs diff 0.5 at \(1, 2\).*1 of 6 elements"):
        assert_outputs_close(actual, expected, atol=1e-3)
    assert assert_outputs_close(actual, expected, atol=0.6) == 0.5
    with pytest.raises(AssertionError, match="shape"):
        assert_outputs_close(actual[0], expected)


FIXTURE_TEST = '''
import diffcore
from diffcore.registry import get_registry

class Plugin:
    @diffcore.hookimpl
    def diffcore_register_models(self):
        from tests.testing_plugin import TinyConfig, _model
        return [diffcore.ModelSpec(name="fixture-tiny", config=TinyConfig, factory=_model)]

def test_fixtures(diffcore_plugins, diffcore_context, diffcore_run):
    registry = diffcore_plugins(Plugin())
    assert get_registry() is registry and "fixture-tiny" in registry.names("model")
    ctx = diffcore_context()
    assert ctx.step_random is not None
    assert callable(diffcore_run)

def test_registry_restored():
    assert "fixture-tiny" not in get_registry().names("model")
'''


def test_the_pytest_plugin_provides_its_fixtures(tmp_path):
    (tmp_path / "test_fixtures.py").write_text(FIXTURE_TEST)
    env = {"PYTHONPATH": str(ROOT), "DIFFCORE_NO_PLUGINS": "1", "PATH": ""}
    # installed, diffcore registers the plugin through its pytest11 entry point; else name it
    installed = any(ep.value == "diffcore.testing" for ep in metadata.entry_points(group="pytest11"))
    load = [] if installed else ["-p", "diffcore.testing"]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *load, "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout
