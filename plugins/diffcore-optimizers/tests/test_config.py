"""Each optimizer's keys are validated as $.train.optimizer.*, a missing library is a one-line user
error naming the pip package, and the entry module stays light."""

from __future__ import annotations

import json
import sys

import diffcore_dit.plugin
import diffcore_optimizers.plugin
import pytest
from diffcore_optimizers import factories
from diffcore_optimizers.config import (
    AdafactorConfig,
    AdamW8bitConfig,
    LionConfig,
    ProdigyConfig,
    ScheduleFreeAdamWConfig,
)

from diffcore import ConfigError, Problem, UserError
from diffcore.config.job import structure_job
from diffcore.testing import assert_entry_points_light, plugins_registered, run_cli

NAMES = ["adamw8bit", "adafactor", "prodigy", "schedulefree_adamw", "lion"]


PLUGIN_PATHS = ["diffcore_dit.plugin", "diffcore_optimizers.plugin"]


def tiny_job(optimizer: dict, **train: object) -> dict:
    return {"model": {"type": "dit", "hidden_size": 32, "depth": 2, "num_heads": 2, "input_size": 16},
            "method": {"type": "diffusion"}, "data": {"type": "synthetic", "resolution": 16, "size": 8},
            "train": {"batch_size": 4, "optimizer": optimizer, **train}}  # fmt: skip


@pytest.fixture(autouse=True)
def registered():
    with plugins_registered(diffcore_dit.plugin, diffcore_optimizers.plugin):
        yield


def problems(optimizer: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        structure_job(tiny_job(optimizer))
    return {p.path: p.message for p in err.value.problems}


def test_entry_point_imports_no_torch() -> None:
    assert assert_entry_points_light("diffcore-optimizers") == ["diffcore_optimizers.plugin"]


def test_registered_names() -> None:
    specs = diffcore_optimizers.plugin.diffcore_register_optimizers()
    assert [s.name for s in specs] == NAMES
    # only schedule-free moves the weights between a training and an evaluation point
    assert [s.name for s in specs if s.set_mode is not None] == ["schedulefree_adamw"]
    # torch's Adafactor needs no library of its own
    assert [s.name for s in specs if s.validate is None] == ["adafactor"]


@pytest.mark.parametrize("name", NAMES)
def test_unknown_key_is_named_with_the_closest(name: str) -> None:
    assert problems({"type": name, "weight_decai": 0.1}) == {
        "$.train.optimizer.weight_decai": "unknown key; did you mean 'weight_decay'?"
    }


@pytest.mark.parametrize(
    ("name", "key", "value", "says"),
    [
        ("adamw8bit", "betas", [0.9, 1.0], "betas must each be in [0, 1)"),
        ("adamw8bit", "min_8bit_size", -1, "min_8bit_size must not be negative"),
        ("adafactor", "beta2_decay", 0.5, "beta2_decay must be at most 0"),
        ("adafactor", "d", 0, "d must be positive"),
        ("prodigy", "d0", 0, "d0 must be positive"),
        ("prodigy", "growth_rate", 0.5, "growth_rate must be at least 1"),
        ("prodigy", "beta3", 1.0, "beta3 must be in [0, 1)"),
        ("schedulefree_adamw", "betas", [0.0, 0.999], "betas[0] must be above 0"),
        ("schedulefree_adamw", "warmup_steps", -3, "warmup_steps must not be negative"),
        ("lion", "weight_decay", -0.1, "weight_decay must not be negative"),
    ],
)
def test_bad_ranges_are_named(name: str, key: str, value: object, says: str) -> None:
    found = problems({"type": name, key: value})
    assert list(found) == [f"$.train.optimizer.{key}"]
    assert says in found[f"$.train.optimizer.{key}"]


def test_defaults_are_valid() -> None:
    for config in (AdamW8bitConfig, AdafactorConfig, ProdigyConfig, ScheduleFreeAdamWConfig, LionConfig):
        config()


@pytest.mark.parametrize(
    ("factory", "config", "module", "install"),
    [
        (factories.adamw8bit, AdamW8bitConfig(), "bitsandbytes", "pip install diffcore-optimizers[8bit]"),
        (factories.prodigy, ProdigyConfig(), "prodigyopt", "pip install prodigyopt"),
        (factories.schedulefree_adamw, ScheduleFreeAdamWConfig(), "schedulefree", "pip install schedulefree"),
        (factories.lion, LionConfig(), "lion_pytorch", "pip install lion-pytorch"),
    ],
)
def test_a_missing_library_names_the_pip_package(monkeypatch, factory, config, module, install) -> None:
    import torch

    name = factory.__name__
    spec = {s.name: s for s in diffcore_optimizers.plugin.diffcore_register_optimizers()}[name]
    job = structure_job(tiny_job({"type": name}))
    assert spec.validate(job) == []
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    says = f"the {name} optimizer needs the Python package {module}, which is not installed"
    # found before the model loads (diffcore validate, the run's start), without importing it
    assert spec.validate(job) == [Problem("$.train.optimizer.type", f"{says} ({install})")]
    # and where the optimizer is built
    with pytest.raises(UserError) as err:
        factory([torch.nn.Parameter(torch.zeros(2))], config, 1e-3)
    assert str(err.value) == f"$.train.optimizer.type: {says} ({install})"


def test_diffcore_validate_exits_2_naming_the_package(tmp_path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(tiny_job({"type": "adamw8bit"})))
    result = run_cli("validate", str(job), plugins=PLUGIN_PATHS, pythonpath=[hide])
    assert result.returncode == 2, result.stderr
    assert (
        "$.train.optimizer.type: the adamw8bit optimizer needs the Python package bitsandbytes, which is not "
        "installed (pip install diffcore-optimizers[8bit])"
    ) in result.stderr
    ok = run_cli("validate", str(job), plugins=PLUGIN_PATHS)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    ("train", "named"),
    [({"deepspeed": {"zero_stage": 3}}, "zero_stage 3 with mixed_precision no"),
     ({"mixed_precision": "bf16"}, "zero_stage 0 with mixed_precision bf16")],
)
def test_schedulefree_refuses_master_weight_setups_before_loading(train: dict, named: str) -> None:
    spec = {s.name: s for s in diffcore_optimizers.plugin.diffcore_register_optimizers()}["schedulefree_adamw"]
    assert spec.validate(structure_job(tiny_job({"type": "schedulefree_adamw"}))) == []
    job = structure_job(tiny_job({"type": "schedulefree_adamw"}, **train))
    [problem] = spec.validate(job)
    assert problem.path == "$.train.optimizer.type"
    assert f"would not follow at {named}: use train.deepspeed.zero_stage 1 or 2" in problem.message
    for fine in ({"deepspeed": {"zero_stage": 1}, "mixed_precision": "bf16"}, {"deepspeed": {"zero_stage": 2}}):
        assert spec.validate(structure_job(tiny_job({"type": "schedulefree_adamw"}, **fine))) == []


@pytest.mark.parametrize("name", NAMES)
def test_each_factory_builds_its_library_optimizer(name: str) -> None:
    import torch

    spec = {s.name: s for s in diffcore_optimizers.plugin.diffcore_register_optimizers()}[name]
    p = torch.nn.Parameter(torch.zeros(64, 64))
    optimizer = spec.factory([p], spec.config(), 1e-3)
    assert type(optimizer).__name__ == {
        "adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "prodigy": "Prodigy",
        "schedulefree_adamw": "AdamWScheduleFree", "lion": "Lion",
    }[name]  # fmt: skip
    if spec.set_mode is not None:
        spec.set_mode(optimizer, True)
    p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    assert (p < 0).all()  # a positive gradient moved every weight down


def test_prodigy_sharded_all_reduces_its_estimate() -> None:
    import torch

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert factories.prodigy(params, ProdigyConfig(), 1.0).param_groups[0]["fsdp_in_use"] is False
    assert factories.prodigy(params, ProdigyConfig(sharded=True), 1.0).param_groups[0]["fsdp_in_use"] is True
