"""Reflow: generate the teacher's (noise, sample) couplings, then train on their straight lines
(see :class:`diffcore_distill.config.ReflowConfig`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from diffcore.context import TrainContext
from diffcore.errors import Problem, UserError
from diffcore.method import Logs
from diffcore.methods.diffusion import DiffusionMethod, drop_conditions
from diffcore.sampling import build_sampler, generate, noise_like
from diffcore_distill.config import ReflowConfig
from diffcore_distill.consistency import check_zero3
from diffcore_distill.focus import check_focus, focused
from diffcore_distill.pairs import PairCache, Pairs
from diffcore_distill.teacher import Teacher, build_teacher

WHERE = "$.method"


def pair_seed(seed: int, index: int) -> int:
    """The seed of pair ``index``'s noise: a splitmix of the job seed and the index."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF
    x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 29)) & 0x7FFFFFFFFFFFFFFF


class ReflowMethod(DiffusionMethod):
    config: ReflowConfig

    def __init__(self, config: ReflowConfig):
        super().__init__(config)
        self.pairs: Pairs | None = None
        self.teacher: Teacher | None = None

    def validate(self, job: Any) -> list[Problem]:
        c, problems = self.config, []
        for key in ("pairs", "shard_size", "sample_steps", "generation_batch"):
            if getattr(c, key) < 1:
                problems.append(Problem(f"{WHERE}.{key}", f"must be at least 1, got {getattr(c, key)}"))
        check_focus(c, WHERE, problems)
        if c.resolution is not None and c.resolution < 8:
            problems.append(Problem(f"{WHERE}.resolution", f"must be at least 8, got {c.resolution}"))
        check_zero3(job, problems)
        return problems

    def setup(self, ctx: TrainContext) -> Iterable[torch.nn.Parameter]:
        model = ctx.model
        if model.prediction_type != "flow" or ctx.scheduler.kind != "flow":
            raise UserError(
                f"reflow straightens rectified-flow models; this {model.architecture or type(model).__name__} "
                f"model predicts {model.prediction_type} on a {ctx.scheduler.kind} schedule",
                where=f"{WHERE}.type",
                hint="use method type lcm for eps and v models",
            )
        trained = list(super().setup(ctx))
        self.teacher = build_teacher(model, ctx.adapter, trained, self.config.teacher, self.config.init_from_teacher)
        self.pairs = self.make_pairs(ctx)
        return trained

    # -- pair generation ----------------------------------------------------------------------------
    def cache(self, ctx: TrainContext) -> PairCache:
        c = self.config
        folder = c.cache_dir if c.cache_dir is not None else ctx.output_dir / "reflow_pairs"
        side = c.resolution or _side(ctx.dataset[0], ctx.model)
        spec = {
            "architecture": ctx.model.architecture,
            "base_model": ctx.model.base_model,
            "teacher": c.teacher,
            "sampler": c.sampler,
            "sample_steps": c.sample_steps,
            # the noise levels the teacher walks (the job scheduler's spacing and shift make them)
            "levels": [round(float(v), 6) for v in self.teacher_levels(ctx, side)],
            "guidance": c.guidance,
            "resolution": side,
            "seed": ctx.job.seed,
            "pairs": c.pairs,
            "shard_size": c.shard_size,
            "dataset": len(ctx.dataset),
        }
        return PairCache(folder, spec)

    def teacher_levels(self, ctx: TrainContext, side: int) -> torch.Tensor:
        model, down = ctx.model, int(ctx.model.latent_downscale)
        latents = torch.empty(1, int(model.latent_channels), side // down, side // down)
        seq_len = int(model.sequence_length(latents)) if ctx.scheduler.kind == "flow" else None
        schedule_as = build_sampler(self.config.sampler).schedule_as
        return ctx.scheduler.sampling_schedule(self.config.sample_steps, schedule_as, seq_len=seq_len).levels

    def make_pairs(self, ctx: TrainContext) -> Pairs:
        cache = self.cache(ctx)
        cache.prepare(write=ctx.is_main)
        _barrier()
        cache.prepare(write=False)
        cache.fill(lambda start, stop: self.generate_pairs(ctx, start, stop), ctx.rank, ctx.world_size, progress=ctx.is_main)
        _barrier()
        return cache.load()

    def generate_pairs(self, ctx: TrainContext, start: int, stop: int) -> tuple[dict[str, torch.Tensor], list[str] | None]:
        """Pairs [start, stop): the teacher's samples from each pair's own noise seed."""
        assert self.teacher is not None
        c, model, dataset = self.config, ctx.model, ctx.dataset
        side = int(cache_side(c, ctx))
        noise, sample, labels, captions = [], [], [], []
        for lo in range(start, stop, c.generation_batch):
            rows = range(lo, min(lo + c.generation_batch, stop))
            examples = [dataset[i % len(dataset)] for i in rows]
            batch: dict[str, Any] = {}
            if all("labels" in e for e in examples):
                batch["labels"] = torch.tensor([int(e["labels"]) for e in examples])
            if all("captions" in e for e in examples):
                batch["captions"] = [str(e["captions"]) for e in examples]
            seeds = [pair_seed(ctx.job.seed, i) for i in rows]
            with self.teacher.active():
                latents = generate(
                    model, ctx.scheduler, batch=batch, height=side, width=side, steps=c.sample_steps,
                    sampler=c.sampler, guidance=c.guidance, seed=seeds, return_latents=True,
                )  # fmt: skip
            # the start noise generate drew from the same seeds (flow starts at unit scale)
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            noise.append(noise_like(torch.empty(latents.shape), gens))
            sample.append(latents.float().cpu())
            if "labels" in batch:
                labels.append(batch["labels"])
            if "captions" in batch:
                captions.extend(batch["captions"])
        tensors = {"noise": torch.cat(noise), "sample": torch.cat(sample)}
        if labels:
            tensors["labels"] = torch.cat(labels)
        return tensors, (captions or None)

    # -- training -------------------------------------------------------------------------------------
    def pair_batch(self, ctx: TrainContext, b: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """b pairs drawn from the step's random stream: (noise, sample, conditioning batch)."""
        assert self.pairs is not None and ctx.step_random is not None
        pairs = self.pairs
        index = ctx.step_random.randint(len(pairs), b)
        batch: dict[str, Any] = {}
        if pairs.labels is not None:
            batch["labels"] = pairs.labels[index]
        if pairs.captions is not None:
            batch["captions"] = [pairs.captions[i] for i in index.tolist()]
        return pairs.noise[index].to(ctx.device), pairs.sample[index].to(ctx.device), batch

    def loss(self, ctx: TrainContext, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        model, sched, rand = ctx.model, ctx.scheduler, ctx.step_random
        assert rand is not None
        b = _rows(batch)
        noise, sample, cond_batch = self.pair_batch(ctx, b)
        if self.config.condition_dropout > 0:
            cond_batch = drop_conditions(model, cond_batch, rand.rand(b) < self.config.condition_dropout)
        cond = model.encode_conditions(cond_batch)
        seq_len = model.sequence_length(sample)
        t = rand.call(lambda n, g: sched.sample_t(n, g, torch.device("cpu"), seq_len=seq_len), b)
        if self.config.focus > 0:
            t = focused(rand, b, self.config.focus, self.focus_levels(ctx, seq_len), t)
        t = t.to(ctx.device)
        noisy = sched.add_noise(sample, noise, t)
        extra: dict[str, Any] = {}
        if model.guidance_embedded:
            extra["guidance"] = torch.full((b,), float(self.config.guidance), device=ctx.device)
        pred = self.predict(model, noisy, t, cond, cond_batch, **extra).float()
        target = sched.target(sample, noise, t, "flow").float()
        return self.regression(ctx, pred, target, t, cond_batch).mean(), {}


    def focus_levels(self, ctx: TrainContext, seq_len: int) -> torch.Tensor:
        """Every level (but the final 0) that Euler sampling at each of ``focus_steps`` evaluates."""
        schedules = [ctx.scheduler.sampling_schedule(n, "euler", seq_len=seq_len) for n in self.config.focus_steps]
        return torch.cat([s.levels[:-1].float() for s in schedules])


def cache_side(config: ReflowConfig, ctx: TrainContext) -> int:
    return config.resolution or _side(ctx.dataset[0], ctx.model)


def _side(example: Mapping[str, Any], model: Any) -> int:
    if "pixels" in example:
        return int(example["pixels"].shape[-1])
    return int(example["latents"].shape[-1]) * int(model.latent_downscale)


def _rows(batch: Mapping[str, Any]) -> int:
    for key in ("latents", "pixels", "labels"):
        if key in batch:
            return int(len(batch[key]))
    return len(batch["captions"])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
