"""Each optimizer's keys are validated as $.train.optimizer.*, a missing library is a one-line user
error naming the pip package, and the entry module stays light."""

from __future__ import annotations

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

from diffcore import ConfigError, UserError
from diffcore.config.job import structure_job
from diffcore.testing import assert_entry_points_light, plugins_registered

NAMES = ["adamw8bit", "adafactor", "prodigy", "schedulefree_adamw", "lion"]


def problems(optimizer: dict) -> dict[str, str]:
    job = {"model": {"type": "dit"}, "method": {"type": "diffusion"}, "data": {"type": "synthetic"},
           "train": {"optimizer": optimizer}}  # fmt: skip
    with plugins_registered(diffcore_dit.plugin, diffcore_optimizers.plugin):
        with pytest.raises(ConfigError) as err:
            structure_job(job)
    return {p.path: p.message for p in err.value.problems}


def test_entry_point_imports_no_torch() -> None:
    assert assert_entry_points_light("diffcore-optimizers") == ["diffcore_optimizers.plugin"]


def test_registered_names() -> None:
    specs = diffcore_optimizers.plugin.diffcore_register_optimizers()
    assert [s.name for s in specs] == NAMES
    # only schedule-free moves the weights between a training and an evaluation point
    assert [s.name for s in specs if s.set_mode is not None] == ["schedulefree_adamw"]


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

    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    with pytest.raises(UserError) as err:
        factory([torch.nn.Parameter(torch.zeros(2))], config, 1e-3)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("$.train.optimizer.type: ")
    assert f"needs the Python package {module}, which is not installed" in text
    assert text.endswith(f"({install})")


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
