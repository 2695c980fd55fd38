"""The sidenet method end to end: it trains under ZeRO 0/2/3 and on two processes, clips and zeroes
its gradients, resumes bit-exactly, exports ``controlnet.safetensors`` and samples through
``diffcore sample --input control=IMG``. Written with diffcore.testing only."""

import json
from pathlib import Path

import probe_plugin
import pytest
import torch
from diffcore_controlnet_example import plugin
from diffcore_controlnet_example.data import ControlShapes, outline
from diffcore_controlnet_example.method import SideNetMethod
from diffcore_controlnet_example.model import ResidualModel
from diffcore_controlnet_example.plugin import ControlShapesConfig, ResidualModelConfig, SideNetConfig
from PIL import Image
from safetensors import safe_open

from diffcore import ConfigError
from diffcore.context import StepRandom
from diffcore.testing import (
    assert_light_import,
    fake_context,
    first_batch,
    run_cli,
    run_job,
)

HERE = Path(__file__).parent
PLUGINS = [plugin, probe_plugin]
#: the same plugins by import path, for subprocesses (probe_plugin is found through pythonpath)
PLUGIN_PATHS = ["diffcore_controlnet_example.plugin", "probe_plugin"]


def job(**train):
    return {
        "seed": 11,
        "model": {"type": "residual-tiny", "width": 8},
        "method": {"type": "sidenet", "width": 8},
        "data": {"type": "control-shapes", "resolution": 8, "size": 16},
        "train": {"steps": 2, "batch_size": 4, "lr": 0.01, "grad_clip": 1.0, "checkpoint_every": 1, "keep_last": 4, **train},
        "callbacks": [{"type": "progress", "enabled": False}, {"type": "probe"}],
    }


def train(out, job_dict, **options):
    return run_job(job_dict, out, plugins=PLUGINS, **options)


def flat(tensors):
    return torch.cat([tensors[k].flatten().double() for k in sorted(tensors)])


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def initial(run, name="controlnet"):
    from safetensors.torch import load_file

    return load_file(str(run.output_dir / "probe" / f"initial-{name}.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One ZeRO-0 run shared by the export and sampling tests."""
    return train(tmp_path_factory.mktemp("trained") / "out", job())


def test_entry_module_imports_no_torch():
    assert_light_import("diffcore_controlnet_example.plugin")


def test_the_side_network_starts_silent_and_then_steers_the_prediction():
    model = ResidualModel(ResidualModelConfig(width=8))
    method = SideNetMethod(SideNetConfig(width=8))
    ctx = fake_context(model, method=method, dataset=ControlShapes(ControlShapesConfig(resolution=8, size=8)))
    assert list(ctx.method_modules) == ["controlnet"]
    # only the side network trains; the backbone collects no gradients
    assert ctx.trainable == list(ctx.method_modules["controlnet"].parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    batch = first_batch(ctx.dataset, 4)
    x, t = torch.randn(4, 3, 8, 8), torch.full((4,), 500.0)
    cond = model.encode_conditions(batch)
    # zero-initialised output: the method predicts exactly what the frozen model predicts
    assert torch.equal(method.predict(model, x, t, cond, batch), model.predict(x, t, cond))
    torch.nn.init.normal_(method.sidenet.zero_out.weight)
    steered = method.predict(model, x, t, cond, batch)
    other = method.predict(model, x, t, cond, {**batch, "control": -batch["control"]})
    assert not torch.allclose(steered, model.predict(x, t, cond))
    assert not torch.allclose(steered, other)
    loss, _ = method.loss(ctx, batch)
    loss.backward()
    assert method.sidenet.zero_out.weight.grad.abs().sum() > 0
    ctx.step_random = StepRandom(0, 0)
    assert torch.equal(loss.detach(), method.loss(ctx, batch)[0].detach())


def test_validate_names_a_model_that_takes_no_residual(tmp_path):
    bad = {**job(), "model": {"type": "plain-tiny"}}
    with pytest.raises(ConfigError) as info:
        train(tmp_path / "bad", bad)
    assert [p.path for p in info.value.problems] == ["$.model.type"]
    assert "'plain-tiny' takes none" in info.value.problems[0].message
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_diffcore_validate_reports_a_model_that_takes_no_residual(tmp_path):
    bad = {**job(), "model": {"type": "plain-tiny"}, "output_dir": str(tmp_path / "out")}
    (tmp_path / "bad.yaml").write_text(json.dumps(bad))  # JSON is YAML
    out = run_cli("validate", str(tmp_path / "bad.yaml"), plugins=PLUGIN_PATHS, pythonpath=[HERE])
    assert out.returncode == 2
    assert "$.model.type" in out.stderr and "'plain-tiny' takes none" in out.stderr


@pytest.mark.parametrize(
    "options",
    [
        {"deepspeed": {"zero_stage": 0}},
        {"deepspeed": {"zero_stage": 2}},
        {"deepspeed": {"zero_stage": 3}},
        {"deepspeed": {"zero_stage": 2}, "mixed_precision": "bf16"},
    ],
    ids=["zero0", "zero2", "zero3", "zero2-bf16"],
)
def test_trains_the_side_network_under_zero(tmp_path, options):
    run = train(tmp_path / "out", job(**options))
    assert [row["step"] for row in run.metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in run.losses)
    start, one, two = initial(run), run.weights("controlnet", "step-1"), run.weights("controlnet")
    assert start["zero_out.weight"].abs().sum() == 0
    assert two["zero_out.weight"].abs().sum() > 0  # the side network learned
    assert not torch.equal(flat(one), flat(two))
    # the backbone is frozen: the same at every step (grad_clip > 0 did not crash on it)
    assert_equal(run.weights("model", "step-1"), run.weights("model"))


def test_exports_its_module(trained):
    for folder in ("final", "step-1", "step-2"):
        path = trained.output_dir / ("final" if folder == "final" else f"checkpoints/{folder}") / "controlnet.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            keys = set(f.keys())
        assert meta["diffcore.module"] == "controlnet"
        assert meta["diffcore.step"] == ("2" if folder == "final" else folder[5:])
        assert "diffcore-controlnet-example" in json.loads(meta["diffcore.versions"])
        assert keys == set(initial(trained))
    assert_equal(trained.weights("controlnet"), trained.weights("controlnet", "step-2"))


def test_clips_its_gradients(tmp_path):
    sgd = {"steps": 1, "lr": 1.0, "optimizer": {"type": "sgd"}, "checkpoint_every": 0}
    clipped = train(tmp_path / "clipped", job(**sgd, grad_clip=1e-3))
    free = train(tmp_path / "free", job(**sgd, grad_clip=None))
    # SGD moves by lr * gradient, so the update's norm is the clipped gradient norm
    moved = float((flat(clipped.weights("controlnet")) - flat(initial(clipped))).norm())
    unclipped = float((flat(free.weights("controlnet")) - flat(initial(free))).norm())
    assert 0.9e-3 < moved <= 1e-3 * (1 + 1e-4)
    assert unclipped > 10 * moved


def test_zeroes_its_gradients_between_steps(tmp_path):
    sgd = {"lr": 0.5, "optimizer": {"type": "sgd"}, "gradient_accumulation": 2, "grad_clip": None}
    straight = train(tmp_path / "straight", job(**sgd))
    grads = [json.loads(x) for x in (straight.output_dir / "probe" / "grads-rank0.jsonl").read_text().splitlines()]
    assert [g["max_grad"] for g in grads] == [0.0, 0.0]  # nothing left over after each optimizer step
    # step 2 moves by its own two micro-batches only: a run that starts step 2 afresh from the
    # step-1 checkpoint (no gradient can carry over) lands on the same weights
    split = tmp_path / "split"
    train(split, job(**sgd, steps=1))
    resumed = train(split, job(**sgd), resume=True)
    assert_equal(resumed.weights("controlnet"), straight.weights("controlnet"))
    step1 = flat(straight.weights("controlnet", "step-1")) - flat(initial(straight))
    step2 = flat(straight.weights("controlnet")) - flat(straight.weights("controlnet", "step-1"))
    assert step1.norm() > 0 and step2.norm() > 0


def test_resumes_bit_exactly(tmp_path):
    options = {"steps": 4, "checkpoint_every": 2, "gradient_accumulation": 2}
    straight = train(tmp_path / "straight", job(**options))
    split = tmp_path / "split"
    train(split, job(**{**options, "steps": 2}))
    resumed = train(split, job(**options), resume=True)
    assert [row["step"] for row in resumed.metrics] == [1, 2, 3, 4]
    assert resumed.losses == straight.losses
    assert_equal(resumed.weights("controlnet"), straight.weights("controlnet"))
    assert_equal(resumed.weights("controlnet", "step-4"), straight.weights("controlnet", "step-4"))


def control_png(path, index=1):
    dataset = ControlShapes(ControlShapesConfig(resolution=8, size=4))
    edges = outline(dataset[index]["pixels"])
    Image.fromarray(((edges[0] + 1) * 127.5).round().byte().numpy()).convert("RGB").save(path)
    return path


def test_samples_through_diffcore_sample(trained, tmp_path):
    png = control_png(tmp_path / "edges.png")
    out = tmp_path / "samples"
    common = ["sample", "--from", str(trained.output_dir), "--label", "1", "--steps", "2", "--count", "2"]
    done = run_cli(*common, "--input", f"control={png}", "--out", str(out), "--device", "cpu", plugins=PLUGIN_PATHS, pythonpath=[HERE])
    assert done.returncode == 0, done.stderr[-3000:]
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 2 and (out / "grid.png").is_file()
    assert Image.open(out / pngs[0]).size == (8, 8)

    missing = run_cli(*common, "--out", str(tmp_path / "none"), plugins=PLUGIN_PATHS, pythonpath=[HERE])
    assert missing.returncode == 2
    assert "needs control" in missing.stderr and "--input control=IMAGE" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_two_processes_keep_the_side_network_identical_on_both_ranks(tmp_path):
    common = {"steps": 2, "checkpoint_every": 0, "deepspeed": {"zero_stage": 2}}
    one = train(tmp_path / "one", job(**common, batch_size=4))
    two = run_job(job(**common, batch_size=2), tmp_path / "two", processes=2, plugins=PLUGIN_PATHS, pythonpath=[HERE])
    digests = [json.loads((two.output_dir / "probe" / f"digest-rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0] == digests[1] and set(digests[0]) == {"controlnet"}
    a, b = one.weights("controlnet"), two.weights("controlnet")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=k)
    assert b["zero_out.weight"].abs().sum() > 0
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
