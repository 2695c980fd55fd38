"""The ``method: {type: lcm | consistency | reflow}`` sections (torch-free: plugin discovery imports it)."""

from __future__ import annotations

import attrs

from diffcore.methods.config import DiffusionMethodConfig


@attrs.define(kw_only=True)
class DistillConfig(DiffusionMethodConfig):
    """What every distillation method shares: the teacher."""

    #: the teacher's weights: a diffcore export of the same architecture (``final/model.safetensors``
    #: or ``final/ema.safetensors`` of a run). None: the job's own model as loaded, with the adapter
    #: switched off when the student is an adapter (no second copy of the weights).
    teacher: str | None = None
    #: start the student from the teacher file's weights (the model's own weights become the
    #: teacher's, so the teacher is again the base model: no copy with an adapter student); false
    #: keeps the model's own weights for the student and swaps the teacher's in for its calls
    init_from_teacher: bool = True


@attrs.define(kw_only=True)
class ConsistencyConfig(DistillConfig):
    """Consistency distillation from a frozen teacher (Song et al. 2023; LCM, Luo et al. 2023).

    A student f(x, t) (the model's x0 estimate, through LCM's boundary condition on DDPM-family
    schedules) learns to give at a level t_n the x0 that the EMA target gives at the next cleaner
    level t_(n+1) after one guided solver step of the teacher from t_n (DDIM on DDPM-family schedules,
    Euler on rectified flow: the same step on both paths). The loss is the pseudo-Huber distance
    sqrt(d^2 + c^2) - c of the LCM paper, averaged per element.
    """

    #: solver grid: the teacher steps between neighbours of this many levels (LCM: 50, skipping
    #: step T // 50 = 20); sampling with the ``lcm`` sampler uses the same grid on DDPM schedules
    num_solver_steps: int = 50
    #: classifier-free guidance scale the teacher's step uses, drawn uniformly per example from
    #: [low, high] (diffcore's convention: 1 = no guidance; the LCM paper's w is this minus 1).
    #: A distilled-guidance model (Flux) gets the drawn value as its guidance input, student and
    #: teacher; other models get no guidance input (LCM-LoRA's choice): the student learns the
    #: guided trajectories of the range, so keep it narrow (or one value) for a full model.
    guidance: list[float] = attrs.Factory(lambda: [3.0, 8.0])
    #: decay of the EMA target network (LCM: 0.95); 0 takes the online student without gradient
    #: as the target (the LCM-LoRA training scripts' choice)
    target_ema: float = 0.95
    #: the pseudo-Huber constant c (LCM: 0.001 on SD latents)
    huber_c: float = 0.001
    #: share of the solver intervals drawn among those that start where the ``lcm`` sampler
    #: evaluates at ``focus_steps`` (the grid interval nearest each level); the rest uniformly.
    #: The sampler's output is the student's x0 at those levels alone.
    focus: float = 0.0
    focus_steps: list[int] = attrs.Factory(lambda: [2, 4])


@attrs.define(kw_only=True)
class ReflowConfig(DistillConfig):
    """Rectified-flow reflow (Liu et al. 2022): the teacher's ODE couples noise with samples; the
    student learns the straight line between each pair, so 1-4 Euler steps follow it.

    Before training, ``pairs`` (noise, sample) pairs are generated with the teacher into
    ``cache_dir`` as safetensors shards of ``shard_size`` pairs with a ``manifest.json``; pair i
    takes the conditioning (class or caption) of dataset example i mod len(dataset) and the noise of
    seed (job seed, i). A shard is written atomically when complete, so an interrupted run (or
    ``--resume``) generates only the missing shards; a cache made with other settings is refused,
    but one of another ``pairs`` count is adopted, keeping the shards the two counts share.
    """

    pairs: int = 1024
    shard_size: int = 256
    #: where the pair cache lives (default: <output_dir>/reflow_pairs); share it between runs
    cache_dir: str | None = None
    #: the teacher's sampling: sampler, steps, classifier-free guidance (distilled-guidance
    #: models take it as their guidance input)
    sampler: str = "euler"
    sample_steps: int = 20
    guidance: float = 4.5
    #: side of the generated images (default: the size of the first dataset example)
    resolution: int | None = None
    #: images per teacher call
    generation_batch: int = 64
    #: share of training times drawn from the levels a few-step Euler sampler evaluates
    #: (``focus_steps``, spaced as the job's scheduler spaces them); the rest come from the
    #: scheduler's timestep sampling. A logit-normal draw puts ~1% of the times above 0.9, yet
    #: every few-step sample starts with a prediction from pure noise (t = 1), the hardest one.
    focus: float = 0.5
    #: the step counts whose sampling levels ``focus`` draws from (with flux spacing, 2 steps
    #: evaluate t = 1 and 0.5, 4 steps 1, 0.75, 0.5, 0.25)
    focus_steps: list[int] = attrs.Factory(lambda: [2, 4])
