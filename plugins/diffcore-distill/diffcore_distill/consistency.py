"""Consistency distillation: ``lcm`` for DDPM-family (eps, v) models, ``consistency`` for
rectified-flow models; one loss on both paths (see :class:`diffcore_distill.config.ConsistencyConfig`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from diffcore.context import TrainContext
from diffcore.errors import Problem, UserError
from diffcore.method import Logs
from diffcore.methods.diffusion import DiffusionMethod
from diffcore.sampling import lcm_scalings, to_x0_eps
from diffcore_distill.config import ConsistencyConfig
from diffcore_distill.focus import check_focus, focused
from diffcore_distill.teacher import EMATarget, Teacher, build_teacher

WHERE = "$.method"


def check_zero3(job: Any, problems: list[Problem]) -> None:
    if job.train.deepspeed.zero_stage == 3:
        problems.append(
            Problem("$.train.deepspeed.zero_stage", "distillation swaps teacher and target weights into the model; use ZeRO stage 0-2")
        )


class ConsistencyDistillation(DiffusionMethod):
    """``kind`` "lcm" (DDPM-family schedules, LCM's boundary condition) or "consistency" (flow)."""

    config: ConsistencyConfig

    def __init__(self, config: ConsistencyConfig, kind: str):
        super().__init__(config)
        self.kind = kind
        self.teacher: Teacher | None = None
        self.target: EMATarget | None = None

    def validate(self, job: Any) -> list[Problem]:
        c, problems = self.config, []
        if len(c.guidance) not in (1, 2) or min(c.guidance) < 1.0 or c.guidance[0] > c.guidance[-1]:
            problems.append(Problem(f"{WHERE}.guidance", f"must be [low, high] with 1 <= low <= high (or one value), got {c.guidance}"))
        if c.num_solver_steps < 2:
            problems.append(Problem(f"{WHERE}.num_solver_steps", f"must be at least 2, got {c.num_solver_steps}"))
        if not 0.0 <= c.target_ema < 1.0:
            problems.append(Problem(f"{WHERE}.target_ema", f"must be in [0, 1), got {c.target_ema}"))
        check_focus(c, WHERE, problems)
        if c.huber_c <= 0:
            problems.append(Problem(f"{WHERE}.huber_c", f"must be positive, got {c.huber_c}"))
        check_zero3(job, problems)
        return problems

    def setup(self, ctx: TrainContext) -> Iterable[torch.nn.Parameter]:
        model, kind = ctx.model, ctx.scheduler.kind
        flow = model.prediction_type == "flow" or kind == "flow"
        if self.kind == "lcm" and flow:
            raise UserError(
                f"lcm distils DDPM-family (eps, v) models; this {model.architecture or type(model).__name__} "
                f"model predicts {model.prediction_type} on a {kind} schedule",
                where=f"{WHERE}.type",
                hint="use method type consistency (1-2 step sampling) or reflow for rectified-flow models",
            )
        if self.kind == "consistency" and not flow:
            raise UserError(
                f"consistency distils rectified-flow models; this {model.architecture or type(model).__name__} "
                f"model predicts {model.prediction_type} on a {kind} schedule",
                where=f"{WHERE}.type",
                hint="use method type lcm for eps and v models",
            )
        trained = list(super().setup(ctx))
        self.teacher = build_teacher(model, ctx.adapter, trained, self.config.teacher, self.config.init_from_teacher)
        self.target = EMATarget(trained, self.config.target_ema)
        return trained

    # -- the solver grid ----------------------------------------------------------------------------
    def grid(self, ctx: TrainContext, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) model times of the N solver intervals, end the cleaner level."""
        sched, n = ctx.scheduler, self.config.num_solver_steps
        if sched.kind == "ddpm":
            k = sched.num_train_timesteps // n
            start = torch.arange(1, n + 1, dtype=torch.float64) * k - 1
            return start, (start - k).clamp(min=0)
        levels = sched.sampling_schedule(n, "euler", seq_len=seq_len).levels
        return levels[:-1], levels[1:]

    def focus_intervals(self, ctx: TrainContext, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The solver intervals whose start is nearest each level the ``lcm`` sampler evaluates at
        ``focus_steps`` (one entry per level, so a level two step counts share weighs twice)."""
        sched = ctx.scheduler
        wanted = [sched.sampling_schedule(n, "lcm", seq_len=seq_len) for n in self.config.focus_steps]
        levels = torch.cat([s.timesteps.double() for s in wanted])
        return (starts.double()[None, :] - levels[:, None]).abs().argmin(1)

    def consistency_x0(self, ctx: TrainContext, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The consistency function f(x, t) from a model output: its x0, blended with x through LCM's
        boundary condition on DDPM-family schedules (rectified flow's x0 = x - t v needs none)."""
        alpha, sigma = self._coefficients(ctx, t, x)
        x0, _ = to_x0_eps(out.float(), x, alpha, sigma, ctx.model.prediction_type)
        if ctx.scheduler.kind != "ddpm":
            return x0
        c_skip, c_out = lcm_scalings(t.double())
        shape = (-1,) + (1,) * (x.ndim - 1)
        return c_out.float().reshape(shape) * x0 + c_skip.float().reshape(shape) * x

    @staticmethod
    def _coefficients(ctx: TrainContext, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = ctx.scheduler.alpha_sigma(t)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha.float().reshape(shape).to(like.device), sigma.float().reshape(shape).to(like.device)

    # -- the loss -------------------------------------------------------------------------------------
    def loss(self, ctx: TrainContext, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        assert self.teacher is not None and self.target is not None, "setup runs before loss"
        self.target.update(ctx.step)
        model, device, c = ctx.model, ctx.device, self.config
        rand = ctx.step_random
        assert rand is not None, "the loop sets ctx.step_random before every micro-step"
        latents = self.clean_latents(ctx, batch)
        b = latents.shape[0]
        cond = self.conditions(ctx, batch)
        noise = rand.randn(tuple(latents.shape)).to(device)
        starts, ends = self.grid(ctx, model.sequence_length(latents))
        index = rand.randint(len(starts), b)
        if c.focus > 0:
            near = self.focus_intervals(ctx, starts, model.sequence_length(latents))
            index = focused(rand, b, c.focus, near, index)
        t_start = starts[index].float().to(device)
        t_end = ends[index].float().to(device)
        low, high = c.guidance[0], c.guidance[-1]
        w = (low + (high - low) * rand.rand(b)).float().to(device)

        extra: dict[str, Any] = {}
        cfg = False
        if model.guidance_embedded:
            extra["guidance"] = w
        else:
            cfg = high != 1.0
        a_s, s_s = self._coefficients(ctx, t_start, latents)
        x_start = a_s * latents + s_s * noise

        out = self.predict(model, x_start, t_start, cond, batch, **extra)
        student = self.consistency_x0(ctx, out, x_start, t_start)

        with self.teacher.active():
            ptype = model.prediction_type
            x0, eps = to_x0_eps(self.predict(model, x_start, t_start, cond, batch, **extra).float(), x_start, a_s, s_s, ptype)
            if cfg:
                null = model.null_batch(batch)
                uncond = model.encode_conditions(null)
                out_u = self.predict(model, x_start, t_start, uncond, null, **extra).float()
                x0_u, eps_u = to_x0_eps(out_u, x_start, a_s, s_s, ptype)
                scale = w.reshape((-1,) + (1,) * (x0.ndim - 1))
                x0 = x0_u + scale * (x0 - x0_u)
                eps = eps_u + scale * (eps - eps_u)
            # one solver step to the cleaner level: DDIM, which on a rectified-flow path is Euler
            a_e, s_e = self._coefficients(ctx, t_end, latents)
            x_end = a_e * x0 + s_e * eps
        with self.target.active():
            target = self.consistency_x0(ctx, self.predict(model, x_end, t_end, cond, batch, **extra), x_end, t_end)

        diff = student.float() - target.float()
        err = torch.sqrt(diff**2 + c.huber_c**2) - c.huber_c
        return err.flatten(1).mean(1).mean(), {}

    def state_dict(self) -> dict[str, Any]:
        return self.target.state_dict() if self.target is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target is not None and state:
            self.target.load_state_dict(state)
