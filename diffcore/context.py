"""What the loop shares with methods and callbacks while it runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.data.sampler import hash_seed


class StepRandom:
    """The random draws of one micro-step, made for the global batch and sliced for this rank.

    Seeded by (seed, micro-step), so every rank draws the same global tensors, N ranks reproduce one
    rank with an N-times batch, and a resumed run draws exactly what the uninterrupted one drew.
    Draws happen on the CPU generator (identical on every device); callers move results.
    """

    def __init__(self, seed: int, micro_step: int, rank: int = 0, world_size: int = 1):
        self.generator = torch.Generator().manual_seed(hash_seed(seed, micro_step, 0xD1FF))
        self.rank = rank
        self.world_size = world_size

    def _slice(self, full: torch.Tensor, local: int) -> torch.Tensor:
        return full[self.rank * local : (self.rank + 1) * local]

    def randn(self, local_shape: tuple[int, ...]) -> torch.Tensor:
        b = local_shape[0]
        full = torch.randn((b * self.world_size, *local_shape[1:]), generator=self.generator)
        return self._slice(full, b)

    def rand(self, local_n: int) -> torch.Tensor:
        return self._slice(torch.rand(local_n * self.world_size, generator=self.generator), local_n)

    def call(self, fn: Callable[[int, torch.Generator], torch.Tensor], local_n: int) -> torch.Tensor:
        """``fn(global_n, generator)`` drawn once for the global batch, this rank's slice returned."""
        return self._slice(fn(local_n * self.world_size, self.generator), local_n)


@attrs.define(kw_only=True)
class TrainContext:
    """The running job. ``step`` counts optimizer steps done; ``is_main`` is rank 0."""

    job: Any
    model: Any
    scheduler: Any
    method: Any
    dataset: Any
    output_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
    adapter: Any = None
    adapter_params: list[torch.nn.Parameter] | None = None
    engine: Any = None
    sampler: Any = None
    ema: Any = None
    step: int = 0
    step_random: StepRandom | None = None
    start_time: float = attrs.Factory(time.time)
    trainable: list[torch.nn.Parameter] = attrs.Factory(list)
    last_checkpoint: Path | None = None
    callbacks: list[Any] = attrs.Factory(list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def total_steps(self) -> int:
        return self.job.train.steps

    def gathered(self, params: Any = None) -> Any:
        """A context in which ``params`` (default: the backbone's) are whole on every rank: under
        ZeRO-3 DeepSpeed partitions them, so exporting or sampling must gather them first."""
        import contextlib

        if self.job.train.deepspeed.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.model.backbone.parameters()) if params is None else list(params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    @property
    def lr(self) -> float:
        if self.engine is None:
            return 0.0
        return float(self.engine.optimizer.param_groups[0]["lr"])
