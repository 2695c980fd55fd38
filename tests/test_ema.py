"""The EMA: diffusers' warm-up schedule, its files in the layout of the trained weights, resume, and
``diffcore sample --weights``."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffcore.commands.sample import add_sample_arguments, load_for_sampling
from diffcore.config.job import structure_job
from diffcore.errors import ConfigError, UserError
from diffcore.training import run_job
from diffcore.training.ema import EMA, ema_decay_at
from diffcore.training.manifest import write_manifest
from tests.jobs import tiny_job

pytest.importorskip("diffcore_dit")

# a DiT's model.safetensors is in the diffusers layout, its parameters under the original names
DIT = {"type": "dit", "hidden_size": 16, "depth": 1, "num_heads": 2, "patch_size": 4, "in_channels": 3,
       "input_size": 8, "num_classes": 4, "prediction_type": "flow"}  # fmt: skip
EMA_TRAIN = {"steps": 3, "batch_size": 4, "checkpoint_every": 3, "ema_decay": 0.9}


def dit_job(out, **sections):
    job = tiny_job(out, **sections)
    job["model"], job["scheduler"] = dict(DIT), {"type": "flow"}
    return job


def sample_args(out, *extra):
    parser = argparse.ArgumentParser()
    add_sample_arguments(parser)
    return parser.parse_args(["--from", str(out), "--label", "0", *extra])


@pytest.mark.parametrize(
    "options",
    [
        {"use_ema_warmup": True, "inv_gamma": 1.0, "power": 2 / 3},
        {"use_ema_warmup": True, "inv_gamma": 3.0, "power": 0.75, "update_after_step": 5, "min_decay": 0.2},
        {"use_ema_warmup": False, "update_after_step": 2},
    ],
)
def test_the_decay_and_the_average_follow_diffusers_ema_model(options):
    from diffusers.training_utils import EMAModel

    decay = 0.95
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    reference = EMAModel([param], decay=decay, **options)
    ours = EMA(
        [param], ["p"], decay, warmup=options["use_ema_warmup"], inv_gamma=options.get("inv_gamma", 1.0),
        power=options.get("power", 2 / 3), min_decay=options.get("min_decay", 0.0),
        start_step=options.get("update_after_step", 0),
    )  # fmt: skip
    for step in range(1, 40):
        with torch.no_grad():
            param.add_(torch.randn(5))
        reference.step([param])
        ours.update(step)
        # diffusers' constant-decay mode ramps (1 + n) / (10 + n); ours holds ema_decay from the start
        if options["use_ema_warmup"]:
            assert ours.decay_at(step) == pytest.approx(reference.cur_decay_value, abs=1e-12), step
            torch.testing.assert_close(ours.shadow[0], reference.shadow_params[0], rtol=1e-6, atol=1e-6)
        elif step <= 3:  # both copy the weights up to and just after the start step
            assert ours.decay_at(step) == reference.cur_decay_value == 0.0
    assert ema_decay_at(10**9, decay) == decay  # capped


def test_a_decay_of_0_999_leaves_the_random_start_behind():
    # the report's case: 2000 steps at 0.999 kept e^-2 of the initial weights without the warm-up
    kept = 1.0
    for step in range(1, 2001):
        kept *= ema_decay_at(step, 0.999)
    assert kept == 0.0


@pytest.mark.parametrize(
    ("train", "where"),
    [
        ({"ema_warmup": False}, "$.train.ema_warmup"),
        ({"ema_start_step": 10}, "$.train.ema_start_step"),
        ({"ema_decay": 0.9, "ema_min_decay": 0.95}, "$.train.ema_min_decay"),
        ({"ema_decay": 0.9, "ema_power": 0}, "$.train.ema_power"),
        ({"ema_decay": 0.9, "ema_inv_gamma": -1.0}, "$.train.ema_inv_gamma"),
        ({"ema_decay": 0.9, "ema_start_step": -1}, "$.train.ema_start_step"),
    ],
)
def test_contradictory_or_idle_ema_keys_are_refused(tmp_path, train, where):
    with pytest.raises(ConfigError) as err:
        structure_job(tiny_job(tmp_path, train=train))
    assert [p.path for p in err.value.problems] == [where]


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    run_job(structure_job(dit_job(out, train=EMA_TRAIN)))
    return out


def test_ema_files_are_in_the_layout_of_the_model_file_and_load_where_it_loads(dit_run):
    from diffcore.api import build_component
    from diffcore.config.job import load_job

    for folder in (dit_run / "final", dit_run / "checkpoints/step-3"):
        raw, ema = load_file(str(folder / "model.safetensors")), load_file(str(folder / "ema.safetensors"))
        assert {k: (v.shape, v.dtype) for k, v in ema.items()} == {k: (v.shape, v.dtype) for k, v in raw.items()}
        assert any(not torch.equal(ema[k], raw[k]) for k in raw)
        job = load_job(dit_run / "job.yaml")
        model = build_component("model", job.model.type, job.model.config)
        model.load_exported(ema, where=str(folder / "ema.safetensors"))
        reexported = model.export_state_dict("diffusers")
        assert all(torch.equal(reexported[k], ema[k]) for k in ema)
    # the resume state stays in the EMA's own layout, the backbone's parameter names
    state = load_file(str(dit_run / "checkpoints/step-3/ema-state.safetensors"))
    assert "x_embedder.proj.weight" in state and "x_embedder.proj.weight" not in ema


def test_an_adapters_ema_is_an_adapter_file_of_the_same_format(tmp_path):
    pytest.importorskip("diffcore_lora")
    out = tmp_path / "run"
    run_job(structure_job(dit_job(out, adapter={"type": "lora", "rank": 2}, train=EMA_TRAIN)))
    adapter, ema = load_file(str(out / "final/adapter.safetensors")), load_file(str(out / "final/ema.safetensors"))
    assert {k: v.shape for k, v in ema.items()} == {k: v.shape for k, v in adapter.items()}
    assert any(not torch.equal(ema[k], adapter[k]) for k in adapter)
    with safe_open(str(out / "final/adapter.safetensors"), "pt") as a, safe_open(str(out / "final/ema.safetensors"), "pt") as e:
        plain = {k: v for k, v in a.metadata().items() if k != "diffcore.weights"}
        assert {k: v for k, v in e.metadata().items() if k != "diffcore.weights"} == plain
    loaded = load_for_sampling(sample_args(out))
    assert loaded.weights == "ema"
    lora = {n: p for n, p in loaded.model.backbone.named_parameters() if "lora" in n}
    assert lora and sum(float(p.detach().abs().sum()) for p in lora.values()) > 0


def test_sample_takes_the_ema_by_default_and_the_raw_weights_when_asked(dit_run, capsys):
    final = dit_run / "final"
    for extra, file, used in (((), "ema", "ema"), (("--weights", "ema"), "ema", "ema"), (("--weights", "raw"), "model", "raw")):
        loaded = load_for_sampling(sample_args(dit_run, *extra))
        assert loaded.weights == used
        expected = load_file(str(final / f"{file}.safetensors"))
        got = loaded.model.export_state_dict("diffusers")
        assert all(torch.equal(got[k], expected[k]) for k in expected), extra


def test_sample_weights_ema_without_an_ema_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    run_job(structure_job(dit_job(out, train={**EMA_TRAIN, "ema_decay": None, "steps": 1, "checkpoint_every": 0})))
    assert load_for_sampling(sample_args(out)).weights == "raw"
    with pytest.raises(UserError) as err:
        load_for_sampling(sample_args(out, "--weights", "ema"))
    assert err.value.where == "--weights" and "no EMA weights" in str(err.value)


def test_the_class_agreement_figure_says_which_weights_it_used(dit_run, tmp_path):
    out = tmp_path / "run"
    callbacks = [{"type": "progress", "enabled": False}, {"type": "class_agreement", "per_class": 1, "steps": 2}]
    run_job(structure_job(dit_job(out, train={**EMA_TRAIN, "steps": 1, "checkpoint_every": 0}, callbacks=callbacks)))
    assert json.loads((out / "quality.json").read_text())["weights"] == "ema"


@pytest.mark.parametrize("layout", ["current", "before the export"])
def test_resume_continues_the_warm_up_exactly(dit_run, tmp_path, layout):
    straight = tmp_path / "straight"
    run_job(structure_job(dit_job(straight, train={**EMA_TRAIN, "steps": 5})))
    resumed = tmp_path / "resumed"
    shutil.copytree(dit_run, resumed)
    if layout != "current":  # older checkpoints kept the EMA's own state as ema.safetensors
        step = resumed / "checkpoints/step-3"
        (step / "ema.safetensors").unlink()
        (step / "ema-state.safetensors").rename(step / "ema.safetensors")
        write_manifest(step)
    run_job(structure_job(dit_job(resumed, train={**EMA_TRAIN, "steps": 5})), resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        assert (resumed / "final" / name).read_bytes() == (straight / "final" / name).read_bytes(), name
