"""The training loop: build the job's components, hand the trainable ones to DeepSpeed, iterate."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.api import build_component, build_loss_weighting, build_model, component_config
from diffcore.config.job import Job, Section, dump_job
from diffcore.context import StepRandom, TrainContext
from diffcore.data.collate import collate
from diffcore.data.sampler import BucketBatchSampler, hash_seed
from diffcore.errors import ConfigError, TrainingError, UserError
from diffcore.job_checks import check_specs
from diffcore.quantize.build import check_frozen
from diffcore.registry import get_registry
from diffcore.training import checkpoint as ckpt
from diffcore.training import fast_paths, throughput
from diffcore.training.block_swap import hold_on_host, swap_for_training
from diffcore.training.compile import compile_for_training, compiled_metrics, log_compile
from diffcore.training.deepspeed_config import deepspeed_config, loop_clips_gradients
from diffcore.training.distributed import all_mean, all_true, barrier, init_distributed, is_collective_timeout
from diffcore.training.ema import EMA
from diffcore.training.interrupt import RunInterrupted, StopRequest
from diffcore.training.modules import TrainedModules, parameter_names
from diffcore.training.phases import Phases, captured_output
from diffcore.training.reshard import needs_universal
from diffcore.training.run_lock import RunLock, acquire
from diffcore.training.schedule import lr_lambda
from diffcore.training.window import LossWindow

#: callbacks every run has, before the job's own
DEFAULT_CALLBACKS = ["checkpoint", "metrics", "progress"]


@attrs.frozen
class TrainResult:
    output_dir: Path
    steps: int
    final: Path | None
    last_loss: float | None


def build_callbacks(job: Job) -> list[Any]:
    named = {c.type for c in job.callbacks}
    sections = [Section(type=name, config=component_config("callback", name, {})) for name in DEFAULT_CALLBACKS if name not in named]
    if "tensorboard" not in named and _tensorboard_available():
        sections.append(Section(type="tensorboard", config=component_config("callback", "tensorboard", {})))
    sections += job.callbacks
    return [build_component("callback", s.type, s.config) for s in sections]


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def scheduler_section(job: Job, model: Any) -> Section:
    if job.scheduler is not None:
        return job.scheduler
    default = dict(model.default_scheduler)
    name = default.pop("type")
    return Section(type=name, config=component_config("scheduler", name, default, where="$.scheduler"))


def run_job(job: Job, *, resume: bool = False) -> TrainResult:
    # DeepSpeed prints its communication op build here: shown with --debug or if it fails
    with captured_output():
        dist = init_distributed(job.train.device, job.train.collective_timeout_s, job.train.num_threads)
    torch.manual_seed(hash_seed(job.seed, dist.rank, 1))
    import random

    import numpy as np

    random.seed(hash_seed(job.seed, dist.rank, 2))
    np.random.seed(hash_seed(job.seed, dist.rank, 3) % (2**32))

    out = Path(job.output_dir)
    lock = _take_output_dir(out, dist.rank)
    phases = Phases(main=dist.rank == 0, stall_after_s=job.train.stall_warning_s).start()
    try:
        return _run_locked(job, dist, out, resume, phases)
    finally:
        phases.close()
        if lock is not None:
            lock.release()


def _take_output_dir(out: Path, rank: int) -> RunLock | None:
    """Rank 0 checks the output directory and takes its lock; every rank learns whether it could."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = acquire(out)
        except UserError as exc:
            error = exc
    if not all_true(error is None):
        if lock is not None:
            lock.release()
        raise error or UserError("rank 0 could not take the output directory (see its message)", where=str(out))
    return lock


def _run_locked(job: Job, dist: Any, out: Path, resume: bool, phases: Phases) -> TrainResult:
    newest = ckpt.latest_checkpoint(out)
    if newest is not None and not resume:
        raise UserError(
            f"output_dir already holds checkpoints (newest {newest.name})",
            where=str(out),
            hint="pass --resume to continue it, or choose another output_dir",
        )
    existing = ckpt.resume_checkpoint(out, uses_ema=job.train.ema_decay is not None, rank=dist.rank) if resume else None
    if resume and existing is None and dist.rank == 0:
        print(f"diffcore: no checkpoint in {out} to resume from; starting at step 0", flush=True)

    _check_precision(job, dist.device)
    check_specs(job)
    with phases.phase("reading the dataset"):
        dataset = build_component("dataset", job.data.type, job.data.config)
    # the batching is checked before any model loads: a dataset smaller than one batch fails at once
    sampler = BucketBatchSampler(
        dataset, job.train.batch_size, seed=job.seed, rank=dist.rank, world_size=dist.world_size,
        drop_last=job.train.drop_last,
    )
    cache = _open_cache(job, dataset)
    model_config = job.model.config
    if cache is not None and cache.complete and get_registry().get("model", job.model.type).spec.cache_aware:
        # everything the encoders would compute is on disk: do not load them at all
        model_config = attrs.evolve(model_config, load_encoders=False)
    with phases.phase(f"loading the model ({job.model.type})"):
        model = build_model(
            job.model.type, model_config, quantize=job.model.quantize, device=dist.device,
            mixed_precision=job.train.mixed_precision,
        )  # fmt: skip
    sched_section = scheduler_section(job, model)
    scheduler = build_component("scheduler", sched_section.type, sched_section.config)
    method = build_component("method", job.method.type, job.method.config)
    problems = method.validate(job)
    if problems:
        raise ConfigError(problems, source=job.source)
    held = hold_on_host(job, model)  # train.blocks_to_swap: those blocks stay on the host
    model.to(dist.device)
    if cache is not None:
        with phases.phase("filling the cache", quiet=False):
            dataset = _fill_cache(cache, job, dataset, model, dist.rank)
    if job.train.gradient_checkpointing:
        model.set_gradient_checkpointing(True)

    ctx = TrainContext(
        job=job,
        model=model,
        scheduler=scheduler,
        method=method,
        dataset=dataset,
        output_dir=out,
        device=dist.device,
        rank=dist.rank,
        world_size=dist.world_size,
        versions=get_registry().versions(),
        loss_weighting=build_loss_weighting(job.loss_weighting),
    )
    if job.adapter is not None:
        ctx.adapter = build_component("adapter", job.adapter.type, job.adapter.config)
        ctx.adapter_params = list(ctx.adapter.attach(model))
    ctx.method_modules = dict(method.modules(model))
    for module in ctx.method_modules.values():
        module.to(dist.device).train()
    fast_paths.prepare(job.train, [model.backbone, *ctx.method_modules.values()], dist.device)
    module_params = [p for m in ctx.method_modules.values() for p in m.parameters()]
    trainable = _unique([p for p in [*method.setup(ctx), *module_params] if p.requires_grad])
    if not trainable:
        raise UserError("nothing to train: the method and adapter left no trainable parameters", where="$.method")
    if job.model.quantize != "none":
        check_frozen(model, trainable, ctx.adapter_params or [])
    ctx.trainable = trainable
    swap_for_training(ctx, held)  # train.blocks_to_swap: hooks on the swapped blocks, before compile
    container = TrainedModules(model, ctx.method_modules)
    names = parameter_names(container, trainable)
    compiled = compile_for_training(model, job.train)  # after block swap: its hooks stay eager

    opt_section = job.optimizer or Section(type="adamw", config=component_config("optimizer", "adamw", {}))
    opt_spec = get_registry().get("optimizer", opt_section.type).spec
    optimizer = opt_spec.factory(trainable, opt_section.config, job.train.lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(job.train.lr_schedule, job.train.steps, job.train.warmup_steps, job.train.min_lr_ratio)
    )
    import deepspeed

    universal = False
    if existing is not None:
        saved_world, saved_stage = ckpt.saved_layout(existing, job)
        universal = needs_universal(saved_world, saved_stage, dist.world_size, job.train.deepspeed.zero_stage)
    # One module holds every trainable parameter (backbone, adapter branches inside it, unfrozen
    # text encoders, the method's modules): clipping, zeroing, the initial broadcast, ZeRO
    # partitioning and mixed precision all apply to the whole of what trains.
    with phases.phase("setting up DeepSpeed"):
        engine, _, _, _ = deepspeed.initialize(
            model=container,
            optimizer=optimizer,
            lr_scheduler=lr_sched,
            config=deepspeed_config(job, dist.world_size, load_universal=universal),
        )
    ctx.engine = engine
    ctx.optimizer_mode = _optimizer_mode(opt_spec, optimizer, engine, opt_section.type)
    if job.train.ema_decay is not None:
        if job.train.deepspeed.zero_stage == 3:
            raise UserError("train.ema_decay is not supported with zero_stage 3", where="$.train.ema_decay")
        t = job.train
        ctx.ema = EMA(
            trainable, names, job.train.ema_decay, warmup=t.ema_warmup, inv_gamma=t.ema_inv_gamma, power=t.ema_power,
            min_decay=t.ema_min_decay, start_step=t.ema_start_step,
        )  # fmt: skip

    # the same batches from the cached dataset: the cache keeps each example's index and bucket
    ctx.sampler = sampler
    if existing is not None:
        with phases.phase(f"resuming from {existing.name}"):
            ckpt.load_checkpoint(ctx, existing, universal=universal)
        ctx.last_checkpoint = existing
    if ctx.optimizer_mode is not None:  # a checkpoint holds the evaluation point; a new run starts there too
        ctx.optimizer_mode(True)
    # everything is built, validated and loaded: only now write into the output directory
    if dist.rank == 0:
        ckpt.clean_stale(out)
        _write_text_atomic(out / "job.yaml", dump_job(job))
    barrier()

    callbacks = build_callbacks(job)
    ctx.callbacks = callbacks
    for cb in callbacks:
        cb.on_train_start(ctx)
    stop = StopRequest().install()
    try:
        try:
            last_loss = _train(ctx, callbacks, stop, phases)
        except RuntimeError as exc:
            if not is_collective_timeout(exc) or ctx.world_size == 1:
                raise
            raise TrainingError(
                f"rank {ctx.rank} of {ctx.world_size} waited more than train.collective_timeout_s="
                f"{job.train.collective_timeout_s:g} s for the other processes at step {ctx.step + 1}: one of them "
                f"stopped or is stuck (its own log says why); the last good checkpoint is "
                f"{ctx.last_checkpoint or 'none yet'}"
            ) from exc
    except BaseException as exc:
        for cb in callbacks:
            try:
                cb.on_exception(ctx, exc)
            except Exception:  # a failing callback must not hide the original error
                pass
        raise
    finally:
        stop.uninstall()
    for cb in callbacks:
        cb.on_train_end(ctx)
    log_compile(compiled, main=dist.rank == 0)
    final = out / "final"
    if dist.rank == 0:
        final.mkdir(parents=True, exist_ok=True)
    barrier()
    with ctx.optimizer_evaluating():
        path = ckpt.export_weights(ctx, final)
        if ctx.ema is not None:
            ckpt.export_ema(ctx, final)
    barrier()
    return TrainResult(output_dir=out, steps=ctx.step, final=path, last_loss=last_loss)


def _optimizer_mode(spec: Any, optimizer: Any, engine: Any, name: str) -> Callable[[bool], None] | None:
    """The optimizer's ``set_mode`` bound to it (None when it has one set of weights). It moves the
    weights the optimizer steps: the module's own, or under ZeRO 1-2 DeepSpeed's fp32 partition, which
    is then copied into the module (every rank takes part, as DeepSpeed gathers the partitions)."""
    if spec.set_mode is None:
        return None
    if engine.optimizer is optimizer:
        return functools.partial(spec.set_mode, optimizer)
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    wrapper = engine.optimizer
    if not isinstance(wrapper, (BF16_Optimizer, DeepSpeedZeroOptimizer)):
        raise UserError(
            f"the {name} optimizer moves the weights between its training and evaluation points, which "
            f"DeepSpeed's {type(wrapper).__name__} (ZeRO-3, or mixed precision at ZeRO stage 0) would not follow",
            where="$.train.optimizer.type",
            hint="use train.deepspeed.zero_stage 1 or 2 (one GPU too), or zero_stage 0 with mixed_precision: no",
        )

    def set_mode(training: bool) -> None:
        spec.set_mode(optimizer, training)
        wrapper.update_lp_params()

    return set_mode


def _check_precision(job: Job, device: torch.device) -> None:
    if job.train.mixed_precision != "fp16":
        return
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        raise UserError(
            f"this device ({_device_name(device)}) has no fp16 support in DeepSpeed",
            where="$.train.mixed_precision",
            hint="use mixed_precision: bf16 (or no)",
        )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}"
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {model}"


def _open_cache(job: Job, dataset: Any) -> Any:
    if not getattr(dataset, "cache_dir", None):
        return None
    from diffcore.data.cache import FeatureCache, encoder_id_for_job

    return FeatureCache(dataset, dataset.cache_dir, encoder_id_for_job(job))


def _fill_cache(cache: Any, job: Job, dataset: Any, model: Any, rank: int) -> Any:
    """Encode what the cache lacks (rank 0; the others wait and re-read), then train from it."""
    if not cache.complete:
        if rank == 0:
            cache.build(model, batch_size=job.train.batch_size, progress=True)
        barrier()
        cache = _open_cache(job, dataset)
    return cache.wrap(dataset)


def _train(ctx: TrainContext, callbacks: list[Any], stop: StopRequest, phases: Phases) -> float | None:
    with fast_paths.attention_backends(ctx.job.train.sdpa_backends):
        return _train_steps(ctx, callbacks, stop, phases)


def _train_steps(ctx: TrainContext, callbacks: list[Any], stop: StopRequest, phases: Phases) -> float | None:
    job = ctx.job
    gas = job.train.gradient_accumulation
    loader = torch.utils.data.DataLoader(
        ctx.dataset,
        batch_sampler=ctx.sampler,
        collate_fn=collate,
        num_workers=job.train.num_workers,
        persistent_workers=False,
        # Its own generator: creating the iterator would otherwise draw a worker seed from the global RNG,
        # one draw more in a resumed run than in a straight one (model code such as adapter dropout uses it).
        generator=torch.Generator().manual_seed(hash_seed(job.seed, ctx.rank, 4)),
    )
    batches = iter(loader)
    engine = ctx.engine
    engine.train()
    if ctx.world_size == 1 and job.train.deepspeed.zero_stage == 0:
        # one process has nothing to average: DeepSpeed would still copy every gradient into a flat
        # buffer, "all-reduce" it with itself and copy it back each step (its own no-backend path)
        engine.enable_backward_allreduce = False
    # fp32 without ZeRO: torch's foreach clip here instead of DeepSpeed's (see loop_clips_gradients)
    clip = job.train.grad_clip if loop_clips_gradients(job) else None
    window = LossWindow(ctx.device)
    window_start, window_samples = time.time(), 0
    meter = throughput.for_run(ctx)
    last_loss = None
    every = job.train.checkpoint_every
    while ctx.step < job.train.steps:
        phases.enter(f"training step {ctx.step + 1}")
        for micro in range(gas):
            batch = next(batches)
            meter.count(batch)
            ctx.step_random = StepRandom(job.seed, ctx.step * gas + micro, ctx.rank, ctx.world_size)
            loss, logs = ctx.method.loss(ctx, batch)
            window.add_micro(loss, logs, ctx.step + 1, 1.0 / gas)
            engine.backward(loss)
            if clip is not None and micro == gas - 1:  # the accumulation boundary: whole, reduced gradients
                torch.nn.utils.clip_grad_norm_(ctx.trainable, clip, foreach=True)
            engine.step()
            ctx.sampler.position += 1
        ctx.step += 1
        last_loss = window.end_step()
        if ctx.ema is not None:
            ctx.ema.update(ctx.step)
        window_samples += ctx.sampler.global_batch * gas
        logged = ctx.step % job.train.log_every == 0 or ctx.step == job.train.steps
        # the host reads the losses only here: at logged steps, and before a checkpoint can keep weights
        if logged or (every and ctx.step % every == 0):
            bad = window.first_bad()
            if bad is not None:
                raise TrainingError(_nan_message(ctx, *bad))
        logs = None
        if logged:
            now = time.time()
            logs = {
                "step": ctx.step,
                **window.close(),
                "lr": ctx.lr,
                "samples_per_sec": window_samples / max(now - window_start, 1e-9),
                **meter.figures(now - window_start),
                **compiled_metrics(ctx.model),
                "elapsed_s": now - ctx.start_time,
                "epoch": ctx.sampler.epoch_of(ctx.sampler.position),
            }
            window_start, window_samples = now, 0
        phases.enter(f"the callbacks after step {ctx.step} (checkpoint, samples...)")
        for cb in callbacks:
            cb.on_step_end(ctx, logs)
        if _stop_agreed(ctx, stop, logged) and ctx.step < job.train.steps:
            _stop_with_checkpoint(ctx, window, stop.signame or "SIGTERM")
    return None if last_loss is None else all_mean(float(last_loss.item()))


def _stop_agreed(ctx: TrainContext, stop: StopRequest, logged: bool) -> bool:
    """Whether to stop after this step. One process checks its own flag every step; several agree at
    logged steps (every rank reaches the same collective; a signal may reach only some of them)."""
    if ctx.world_size == 1:
        return stop.signame is not None
    return logged and not all_true(stop.signame is None)


def _stop_with_checkpoint(ctx: TrainContext, window: LossWindow, signame: str) -> None:
    bad = window.first_bad()
    if bad is not None:  # never checkpoint weights a NaN step produced
        raise TrainingError(_nan_message(ctx, *bad))
    last = ctx.last_checkpoint
    path = last if last is not None and last.name == f"step-{ctx.step}" else ckpt.save_checkpoint(ctx)
    job_file = ctx.job.source or "JOB.yaml"
    raise RunInterrupted(
        signame,
        ctx.step,
        path,
        f"stopped by {signame} at step {ctx.step} of {ctx.job.train.steps}; checkpoint {path}; "
        f"resume with: diffcore run {job_file} --resume",
    )


def _nan_message(ctx: TrainContext, step: int, value: float) -> str:
    kept = f"the last good checkpoint is {ctx.last_checkpoint}" if ctx.last_checkpoint else "no checkpoint was written yet"
    return (
        f"loss became {value} at step {step}; training stopped and {kept}. "
        "Lower train.lr, raise warmup_steps, or use bf16 instead of fp16"
    )


def _unique(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
