"""The lcm, consistency and reflow methods on a tiny DiT: what the teacher and target are, the
losses, exact resume of each (reflow's pair generation included), and the errors that exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffcore_distill import pairs as pairs_module
from diffcore_distill import plugin
from diffcore_distill.config import ConsistencyConfig, ReflowConfig
from diffcore_distill.consistency import ConsistencyDistillation
from diffcore_distill.reflow import ReflowMethod, pair_seed
from diffcore_distill.teacher import EMATarget

import diffcore
from diffcore.context import StepRandom
from diffcore.errors import UserError
from diffcore.sampling import generate
from diffcore.testing import assert_entry_points_light, fake_context, first_batch, run_cli, run_job
from diffcore.weights import save_safetensors

pytest.importorskip("diffcore_dit")
from diffcore_dit import plugin as dit_plugin  # noqa: E402

PLUGINS = [plugin, dit_plugin]
TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2, patch_size=4, in_channels=3, input_size=8, num_classes=4)


def test_entry_module_is_light() -> None:
    assert assert_entry_points_light("diffcore-distill") == ["diffcore_distill.plugin"]


def tiny_dit(prediction_type: str) -> diffcore.model.DiffusionModel:
    torch.manual_seed(0)
    model = diffcore.load_model("dit", prediction_type=prediction_type, **TINY_DIT)
    model.architecture = "dit"
    with torch.no_grad():  # DiT starts with zero output layers (adaLN-zero): give every weight a value
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def scheduler(kind: str):
    return diffcore.build_component("scheduler", kind, {})


def dataset():
    return diffcore.build_component("dataset", "synthetic", {"resolution": 8, "size": 8})


def job(out: Path, method: dict, steps: int, prediction_type: str = "flow", adapter: dict | None = None) -> dict:
    j = {
        "name": "distill",
        "output_dir": str(out),
        "model": {"type": "dit", "prediction_type": prediction_type, **TINY_DIT},
        "scheduler": {"type": "flow" if prediction_type == "flow" else "ddpm"},
        "method": method,
        "data": {"type": "synthetic", "resolution": 8, "size": 8},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1},
    }
    if adapter is not None:
        j["adapter"] = adapter
    return j


# -- teacher and target -------------------------------------------------------------------------
def test_lora_teacher_is_the_base_with_the_adapter_off() -> None:
    pytest.importorskip("diffcore_lora")
    from diffcore_lora import plugin as lora_plugin

    from diffcore.testing import plugins_registered

    with plugins_registered(lora_plugin, dit_plugin):
        model = tiny_dit("eps")
        x, t, cond = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), model.encode_conditions({"labels": torch.tensor([0, 1])})
        base = model.predict(x, t, cond)
        adapter = diffcore.build_component("adapter", "lora", {"rank": 2})
        method = ConsistencyDistillation(ConsistencyConfig(), "lcm")
        ctx = fake_context(model, method=method, scheduler=scheduler("ddpm"), dataset=dataset(), adapter=adapter)
        with torch.no_grad():
            for p in ctx.adapter_params:
                p.add_(0.5)  # the up projections start at zero: make the adapter change the output
        adapted = model.predict(x, t, cond)
        assert (adapted - base).abs().max() > 1e-3
        assert method.teacher is not None and method.teacher.values == []  # no copy of any weight
        with method.teacher.active():
            torch.testing.assert_close(model.predict(x, t, cond), base)
        torch.testing.assert_close(model.predict(x, t, cond), adapted)


def test_full_student_teacher_is_the_weights_before_training_and_target_the_ema() -> None:
    model = tiny_dit("eps")
    method = ConsistencyDistillation(ConsistencyConfig(target_ema=0.5), "lcm")
    ctx = fake_context(model, method=method, scheduler=scheduler("ddpm"), dataset=dataset())
    x, t, cond = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), model.encode_conditions({"labels": torch.tensor([0, 1])})
    before = model.predict(x, t, cond).detach()
    start = [p.detach().clone() for p in ctx.trainable]
    with torch.no_grad():
        for p in ctx.trainable:
            p.add_(0.1)
    assert method.teacher is not None and method.target is not None
    with method.teacher.active():
        torch.testing.assert_close(model.predict(x, t, cond), before)
    method.target.update(1)
    method.target.update(1)  # once per optimizer step, however many micro-steps
    for v, p, s in zip(method.target.values, ctx.trainable, start):
        torch.testing.assert_close(v, 0.5 * s + 0.5 * p.detach())


def test_zero_decay_target_is_the_online_student() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    target = EMATarget([p], 0.0)
    target.update(3)
    with target.active():
        assert torch.equal(p.data, torch.ones(2))
    assert target.state_dict() == {"target_step": 3}


# -- the losses ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "prediction_type"), [("lcm", "eps"), ("lcm", "v"), ("consistency", "flow")])
def test_consistency_loss_trains_the_student(kind: str, prediction_type: str) -> None:
    model = tiny_dit(prediction_type)
    method = ConsistencyDistillation(ConsistencyConfig(guidance=[2.0, 4.0], num_solver_steps=10), kind)
    ctx = fake_context(model, method=method, scheduler=scheduler("flow" if kind == "consistency" else "ddpm"), dataset=dataset())
    loss, _ = method.loss(ctx, first_batch(ctx.dataset, 4))
    assert loss.isfinite() and loss > 0
    loss.backward()
    grads = [p.grad for p in ctx.trainable]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads if g is not None)


def test_consistency_target_at_the_clean_end_is_the_teacher_step() -> None:
    """With every example on the last interval (end level 0), f(x_end, 0) = x_end: the loss is the
    pseudo-Huber distance between the student's x0 and the teacher's one Euler step to s = 0."""
    from diffcore.context import StepRandom

    model = tiny_dit("flow")
    config = ConsistencyConfig(guidance=[1.0], num_solver_steps=2, huber_c=1e-3)
    method = ConsistencyDistillation(config, "consistency")
    ctx = fake_context(model, method=method, scheduler=scheduler("flow"), dataset=dataset())
    with torch.no_grad():  # the student moves away from the teacher (and from the target)
        for p in ctx.trainable:
            p.add_(0.5 * torch.randn_like(p))
    batch = first_batch(ctx.dataset, 2)
    starts, ends = method.grid(ctx, 4)
    assert float(ends[-1]) == 0.0
    # every draw of the interval index picks the last one
    method.grid = lambda ctx, seq_len: (starts[-1:], ends[-1:])  # type: ignore[method-assign]
    loss, _ = method.loss(ctx, batch)

    latents = batch["pixels"].float()
    noise = StepRandom(0, 0).randn(tuple(latents.shape))
    s = float(starts[-1])
    x = (1 - s) * latents + s * noise
    cond = model.encode_conditions(batch)
    t = torch.full((2,), s)
    with torch.no_grad():
        student = x - s * model.predict(x, t, cond)
        assert method.teacher is not None
        with method.teacher.active():
            x_end = x - s * model.predict(x, t, cond)
    err = torch.sqrt((student - x_end) ** 2 + 1e-6) - 1e-3
    assert err.mean() > 1e-3
    torch.testing.assert_close(loss.detach(), err.flatten(1).mean(1).mean(), atol=1e-7, rtol=1e-5)


def test_reflow_loss_regresses_the_straight_line(tmp_path: Path) -> None:
    model = tiny_dit("flow")
    method = ReflowMethod(ReflowConfig(pairs=6, shard_size=4, sample_steps=2, guidance=1.0, cache_dir=str(tmp_path / "pairs")))
    ctx = fake_context(model, method=method, scheduler=scheduler("flow"), dataset=dataset())
    assert method.pairs is not None and len(method.pairs) == 6
    loss, _ = method.loss(ctx, first_batch(ctx.dataset, 4))
    assert loss.isfinite() and loss > 0
    # the pairs are the teacher's samples from each pair's own seed
    labels = method.pairs.labels
    assert labels is not None and labels.tolist() == [int(ctx.dataset[i]["labels"]) for i in range(6)]
    again = generate(model, ctx.scheduler, batch={"labels": labels[4:6]}, height=8, width=8, steps=2, guidance=1.0,
                     seed=[pair_seed(0, 4), pair_seed(0, 5)], return_latents=True)  # fmt: skip
    torch.testing.assert_close(method.pairs.sample[4:6], again)


def test_reflow_focus_trains_at_the_few_step_levels(tmp_path: Path) -> None:
    # every few-step sample starts with a prediction from pure noise (t = 1), which a logit-normal
    # draw almost never trains; focus puts that share of the times on the sampler's own levels
    model = tiny_dit("flow")
    flux = diffcore.build_component("scheduler", "flow", {"sigma_spacing": "flux"})
    seen: list[torch.Tensor] = []

    def times(focus: float) -> torch.Tensor:
        config = ReflowConfig(pairs=4, shard_size=4, sample_steps=2, guidance=1.0, focus=focus, focus_steps=[2, 4],
                              cache_dir=str(tmp_path / "pairs"))  # fmt: skip
        method = ReflowMethod(config)
        ctx = fake_context(model, method=method, scheduler=flux, dataset=dataset())
        seen.clear()
        real = method.predict
        method.predict = lambda m, x, t, *a, **k: seen.append(t.clone()) or real(m, x, t, *a, **k)  # type: ignore[method-assign]
        for micro_step in range(16):
            ctx.step_random = StepRandom(0, micro_step)
            method.loss(ctx, first_batch(ctx.dataset, 4))
        return torch.cat(seen)

    levels = {1.0, 0.75, 0.5, 0.25}
    all_focused = times(1.0)
    assert {round(float(t), 6) for t in all_focused} == levels
    half = times(0.5)
    on_levels = torch.tensor([round(float(t), 6) in levels for t in half])
    assert 0.3 < on_levels.float().mean() < 0.7
    assert not {round(float(t), 6) for t in times(0.0)} & levels


def test_consistency_focus_trains_the_intervals_the_sampler_starts() -> None:
    model = tiny_dit("flow")
    flux = diffcore.build_component("scheduler", "flow", {"sigma_spacing": "flux"})

    def starts(focus: float) -> set[float]:
        method = ConsistencyDistillation(ConsistencyConfig(guidance=[1.0], num_solver_steps=8, focus=focus), "consistency")
        ctx = fake_context(model, method=method, scheduler=flux, dataset=dataset())
        seen: list[torch.Tensor] = []
        real = method.predict
        method.predict = lambda m, x, t, *a, **k: seen.append(t.clone()) or real(m, x, t, *a, **k)  # type: ignore[method-assign]
        found: set[float] = set()
        for micro_step in range(16):
            ctx.step_random = StepRandom(0, micro_step)
            seen.clear()
            method.loss(ctx, first_batch(ctx.dataset, 4))
            found |= {round(float(t), 6) for t in seen[0]}  # the student's call: the interval starts
        return found

    # the grid is 1, 0.875, ..., 0.125; 2- and 4-step lcm sampling evaluates 1, 0.75, 0.5, 0.25
    assert starts(1.0) == {1.0, 0.75, 0.5, 0.25}
    assert len(starts(0.0)) > 4


def test_pairs_of_other_teacher_levels_are_refused(tmp_path: Path) -> None:
    # the pairs depend on the levels the teacher walked: another sigma spacing makes other pairs
    model = tiny_dit("flow")
    config = ReflowConfig(pairs=2, shard_size=2, sample_steps=3, guidance=1.0, cache_dir=str(tmp_path / "pairs"))
    fake_context(model, method=ReflowMethod(config), scheduler=scheduler("flow"), dataset=dataset())
    flux = diffcore.build_component("scheduler", "flow", {"sigma_spacing": "flux"})
    with pytest.raises(UserError, match=r"other settings \(levels\)"):
        fake_context(model, method=ReflowMethod(config), scheduler=flux, dataset=dataset())


# -- the pair cache -------------------------------------------------------------------------------
def make_cache(folder: Path, **spec) -> pairs_module.PairCache:
    return pairs_module.PairCache(folder, {"pairs": 5, "shard_size": 2, "teacher": None, **spec})


def fake_shard(start: int, stop: int):
    n = stop - start
    rows = torch.arange(start, stop, dtype=torch.float32).reshape(n, 1, 1, 1)
    return {"noise": rows.expand(n, 1, 2, 2).clone(), "sample": -rows.expand(n, 1, 2, 2).clone(),
            "labels": torch.arange(start, stop)}, [f"caption {i}" for i in range(start, stop)]  # fmt: skip


def test_pair_cache_resumes_at_the_first_missing_shard(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c")
    cache.prepare(write=True)
    made: list[tuple[int, int]] = []

    def dies_after_two(start: int, stop: int):
        if len(made) == 2:
            raise KeyboardInterrupt("killed")
        made.append((start, stop))
        return fake_shard(start, stop)

    with pytest.raises(KeyboardInterrupt):
        cache.fill(dies_after_two)
    assert cache.missing() == [2] and not list((tmp_path / "c").glob("*.tmp"))
    with pytest.raises(UserError, match="lacks 1 shard"):
        cache.load()
    again: list[tuple[int, int]] = []
    assert make_cache(tmp_path / "c").fill(lambda a, b: again.append((a, b)) or fake_shard(a, b)) == 1
    assert again == [(4, 5)]
    pairs = make_cache(tmp_path / "c").load()
    assert pairs.labels is not None and pairs.labels.tolist() == [0, 1, 2, 3, 4]
    assert pairs.noise[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4] and pairs.captions == [f"caption {i}" for i in range(5)]
    # ranks split the shards
    assert make_cache(tmp_path / "d").missing(1, 2) == [1]


def test_pair_cache_from_other_settings_is_refused(tmp_path: Path) -> None:
    make_cache(tmp_path / "c").prepare(write=True)
    with pytest.raises(UserError, match=r"other settings \(pairs, teacher\)") as info:
        make_cache(tmp_path / "c", pairs=7, teacher="other.safetensors").prepare(write=True)
    assert info.value.where == "$.method.cache_dir"
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["spec"]["pairs"] == 5


@pytest.mark.parametrize(("count", "made"), [(9, [(4, 6), (6, 8), (8, 9)]), (3, [(2, 3)]), (4, [])])
def test_pair_cache_of_another_count_keeps_the_shards_it_shares(tmp_path: Path, count: int, made: list) -> None:
    """5 pairs in shards of 2 are [0, 2), [2, 4), [4, 5). Another count keeps a shard whose pairs are
    its own shard's and makes the rest; the result is what a new cache of that count holds."""
    first = make_cache(tmp_path / "c")
    first.prepare(write=True)
    first.fill(fake_shard)
    other = make_cache(tmp_path / "c", pairs=count)
    other.prepare(write=False)  # another rank: leaves the main rank's cache as it is
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["spec"]["pairs"] == 5
    other.prepare(write=True)
    calls: list[tuple[int, int]] = []
    other.fill(lambda a, b: calls.append((a, b)) or fake_shard(a, b))
    assert calls == made
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["spec"]["pairs"] == count
    fresh = make_cache(tmp_path / "fresh", pairs=count)
    fresh.prepare(write=True)
    fresh.fill(fake_shard)
    got, want = make_cache(tmp_path / "c", pairs=count).load(), fresh.load()
    assert torch.equal(got.noise, want.noise) and got.captions == want.captions
    assert sorted(p.name for p in (tmp_path / "c").glob("pairs-*")) == sorted(p.name for p in (tmp_path / "fresh").glob("pairs-*"))


# -- whole runs: exact resume ---------------------------------------------------------------------
def assert_resumes_exactly(tmp_path: Path, method: dict, prediction_type: str, adapter: dict | None = None) -> None:
    straight = run_job(job(tmp_path / "a", method, 4, prediction_type, adapter), tmp_path / "a", plugins=PLUGINS)
    run_job(job(tmp_path / "b", method, 2, prediction_type, adapter), tmp_path / "b", plugins=PLUGINS)
    resumed = run_job(job(tmp_path / "b", method, 4, prediction_type, adapter), tmp_path / "b", plugins=PLUGINS, resume=True)
    assert [row["step"] for row in resumed.metrics] == [1, 2, 3, 4]
    assert resumed.losses == straight.losses
    name = "adapter" if adapter is not None else "model"
    for key, value in straight.weights(name).items():
        assert torch.equal(resumed.weights(name)[key], value), key


@pytest.mark.slow
def test_lcm_resumes_exactly(tmp_path: Path) -> None:
    assert_resumes_exactly(tmp_path, {"type": "lcm", "guidance": [2.0, 4.0], "target_ema": 0.9}, "eps")


@pytest.mark.slow
def test_consistency_with_a_lora_resumes_exactly(tmp_path: Path) -> None:
    pytest.importorskip("diffcore_lora")
    from diffcore_lora import plugin as lora_plugin

    PLUGINS.append(lora_plugin)
    try:
        assert_resumes_exactly(tmp_path, {"type": "consistency", "num_solver_steps": 8}, "flow", {"type": "lora", "rank": 2})
    finally:
        PLUGINS.remove(lora_plugin)


@pytest.mark.slow
def test_reflow_resumes_exactly_from_mid_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    method = {"type": "reflow", "pairs": 12, "shard_size": 4, "sample_steps": 2, "guidance": 2.0, "generation_batch": 4}
    straight = run_job(job(tmp_path / "a", method, 4), tmp_path / "a", plugins=PLUGINS)
    assert len(list((tmp_path / "a" / "reflow_pairs").glob("pairs-*.safetensors"))) == 3

    real, made = ReflowMethod.generate_pairs, []

    def dies_after_one(self, ctx, start, stop):
        if made:
            raise KeyboardInterrupt("killed")
        made.append(start)
        return real(self, ctx, start, stop)

    monkeypatch.setattr(ReflowMethod, "generate_pairs", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_job(job(tmp_path / "b", method, 2), tmp_path / "b", plugins=PLUGINS)
    monkeypatch.setattr(ReflowMethod, "generate_pairs", lambda self, ctx, a, b: made.append(a) or real(self, ctx, a, b))
    run_job(job(tmp_path / "b", method, 2), tmp_path / "b", plugins=PLUGINS, resume=True)
    assert made == [0, 4, 8]  # the first shard was not generated again
    for shard in ("pairs-00000", "pairs-00001", "pairs-00002"):
        a = (tmp_path / "a" / "reflow_pairs" / f"{shard}.safetensors").read_bytes()
        assert (tmp_path / "b" / "reflow_pairs" / f"{shard}.safetensors").read_bytes() == a
    resumed = run_job(job(tmp_path / "b", method, 4), tmp_path / "b", plugins=PLUGINS, resume=True)
    assert made == [0, 4, 8]
    assert resumed.losses == straight.losses
    for key, value in straight.weights("model").items():
        assert torch.equal(resumed.weights("model")[key], value), key

    # diffcore sample runs the student in 2 Euler steps (and does not generate pairs again)
    shards = sorted((tmp_path / "b" / "reflow_pairs").iterdir())
    out = tmp_path / "samples"
    cli = run_cli("sample", "--from", str(tmp_path / "b"), "--label", "1", "--label", "3", "--steps", "2",
                  "--guidance", "1", "--out", str(out), plugins=["diffcore_distill.plugin", "diffcore_dit.plugin"])  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert sorted(p.name for p in out.glob("sample-*.png")) == ["sample-000-label1-seed0.png", "sample-001-label3-seed1.png"]
    assert sorted((tmp_path / "b" / "reflow_pairs").iterdir()) == shards


# -- errors ---------------------------------------------------------------------------------------
def test_lcm_on_a_flow_model_exits_2(tmp_path: Path) -> None:
    run = run_job(job(tmp_path, {"type": "lcm"}, 1, "flow"), tmp_path / "out", spawn=True, expect_exit=2,
                  plugins=["diffcore_distill.plugin", "diffcore_dit.plugin"])  # fmt: skip
    assert "$.method.type" in run.stderr and "lcm distils DDPM-family" in run.stderr and "consistency" in run.stderr
    assert "Traceback" not in run.stderr


def test_reflow_on_an_eps_model_is_refused() -> None:
    method = ReflowMethod(ReflowConfig(pairs=2))
    with pytest.raises(UserError, match="reflow straightens rectified-flow models") as info:
        fake_context(tiny_dit("eps"), method=method, scheduler=scheduler("ddpm"), dataset=dataset())
    assert info.value.where == "$.method.type"


def test_consistency_on_an_eps_model_is_refused() -> None:
    with pytest.raises(UserError, match="use method type lcm"):
        fake_context(tiny_dit("eps"), method=ConsistencyDistillation(ConsistencyConfig(), "consistency"),
                     scheduler=scheduler("ddpm"), dataset=dataset())  # fmt: skip


def test_a_teacher_of_another_architecture_is_refused(tmp_path: Path) -> None:
    model = tiny_dit("eps")
    tensors = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    save_safetensors(tensors, tmp_path / "sd.safetensors", metadata={"diffcore.architecture": "sd15"})
    method = ConsistencyDistillation(ConsistencyConfig(teacher=str(tmp_path / "sd.safetensors")), "lcm")
    with pytest.raises(UserError, match="is a 'sd15' model, the student is 'dit'") as info:
        fake_context(model, method=method, scheduler=scheduler("ddpm"), dataset=dataset())
    assert info.value.where == "$.method.teacher"
    # a file without the header: its tensors tell (another size of DiT)
    torch.manual_seed(0)
    other = diffcore.load_model("dit", prediction_type="eps", **{**TINY_DIT, "hidden_size": 64})
    save_safetensors(other.backbone.state_dict(), tmp_path / "big.safetensors")
    method = ConsistencyDistillation(ConsistencyConfig(teacher=str(tmp_path / "big.safetensors")), "lcm")
    with pytest.raises(UserError, match="the student's is"):
        fake_context(tiny_dit("eps"), method=method, scheduler=scheduler("ddpm"), dataset=dataset())


@pytest.mark.parametrize("layout", ["own", "diffusers"])
def test_a_teacher_file_is_what_teacher_calls_run(tmp_path: Path, layout: str) -> None:
    """The backbone's own names, or a run's export in the published layout (read through the
    model's load_exported)."""
    model = tiny_dit("eps")
    torch.manual_seed(1)
    teacher = tiny_dit("eps")
    with torch.no_grad():
        for p in teacher.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tensors = teacher.backbone.state_dict() if layout == "own" else teacher.export_state_dict("diffusers")
    assert (layout == "own") == (set(tensors) == set(teacher.backbone.state_dict()))
    save_safetensors(tensors, tmp_path / "t.safetensors", metadata={"diffcore.architecture": "dit"})
    x, t, cond = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), model.encode_conditions({"labels": torch.tensor([0, 1])})
    student = model.predict(x, t, cond).detach()
    expected = teacher.predict(x, t, cond).detach()
    assert (student - expected).abs().max() > 1e-4
    config = ConsistencyConfig(teacher=str(tmp_path / "t.safetensors"), init_from_teacher=False)
    method = ConsistencyDistillation(config, "lcm")
    fake_context(model, method=method, scheduler=scheduler("ddpm"), dataset=dataset())
    assert method.teacher is not None
    with method.teacher.active():
        torch.testing.assert_close(model.predict(x, t, cond), expected)
    torch.testing.assert_close(model.predict(x, t, cond).detach(), student)
    # the default: the student starts from the teacher, which is then the snapshot of those weights
    method = ConsistencyDistillation(ConsistencyConfig(teacher=str(tmp_path / "t.safetensors")), "lcm")
    ctx = fake_context(model, method=method, scheduler=scheduler("ddpm"), dataset=dataset())
    torch.testing.assert_close(model.predict(x, t, cond).detach(), expected)
    with torch.no_grad():
        for p in ctx.trainable:
            p.add_(0.1)
    with method.teacher.active():
        torch.testing.assert_close(model.predict(x, t, cond), expected)
