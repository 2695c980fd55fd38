"""What the loop shares with methods and callbacks while it runs (public: ``diffcore.TrainContext``).

A method draws every random number of a step through ``ctx.step_random``: the draws are made for the
*global* batch from a generator seeded by (seed, micro-step) and sliced for this rank, so ranks agree,
N ranks compute what one rank computes with an N-times batch, and a resumed run draws exactly what the
uninterrupted run drew. Global torch RNG (dropout inside modules) is saved and restored per rank too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.data.sampler import hash_seed


class StepRandom:
    """The random draws of one micro-step, made for the global batch and sliced for this rank.

    Draws happen on a CPU generator (identical on every device); callers move the results.
    ``randn((b, ...))``, ``rand(b)`` and ``randint(high, b)`` take this rank's batch size;
    ``call(fn, b)`` runs any sampler ``fn(global_n, generator)`` once for the global batch.
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

    def randint(self, high: int, local_n: int) -> torch.Tensor:
        """Indices in [0, high), uniformly (the same draws as ``call`` with ``torch.randint``)."""
        return self._slice(torch.randint(0, high, (local_n * self.world_size,), generator=self.generator), local_n)

    def call(self, fn: Callable[[int, torch.Generator], torch.Tensor], local_n: int) -> torch.Tensor:
        """``fn(global_n, generator)`` drawn once for the global batch, this rank's slice returned."""
        return self._slice(fn(local_n * self.world_size, self.generator), local_n)


@attrs.define(kw_only=True)
class TrainContext:
    """The running job, handed to ``Method.setup/loss`` and every callback.

    ``step`` counts optimizer steps done; ``step_random`` is the current micro-step's
    :class:`StepRandom`; ``method_modules`` are the modules the method declared (trained under
    DeepSpeed with the backbone); ``trainable`` every parameter the optimizer updates.
    """

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
    method_modules: dict[str, torch.nn.Module] = attrs.Factory(dict)
    #: the job's ``train.loss_weighting`` built (None: the scheduler's own ``loss_weight``)
    loss_weighting: Any = None
    engine: Any = None
    sampler: Any = None
    ema: Any = None
    step: int = 0
    step_random: StepRandom | None = None
    start_time: float = attrs.Factory(time.time)
    trainable: list[torch.nn.Parameter] = attrs.Factory(list)
    last_checkpoint: Path | None = None
    callbacks: list[Any] = attrs.Factory(list)
    #: diffcore's and every loaded plugin's version (recorded in checkpoints and exports)
    versions: dict[str, str] = attrs.Factory(dict)
    #: moves the weights between the optimizer's training (True) and evaluation (False) points
    #: (``OptimizerSpec.set_mode`` bound to the run's optimizer); None: the two are the same
    optimizer_mode: Callable[[bool], None] | None = None
    _optimizer_evaluating: bool = attrs.field(default=False, init=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def total_steps(self) -> int:
        return self.job.train.steps

    def gathered(self, params: Iterable[torch.nn.Parameter] | None = None) -> contextlib.AbstractContextManager[Any]:
        """A context in which ``params`` (default: the backbone's) are whole on every rank: under
        ZeRO-3 DeepSpeed partitions them, so exporting or sampling must gather them first. Every rank
        must enter it."""
        if self.job.train.deepspeed.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.model.backbone.parameters()) if params is None else list(params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Whole weights (ZeRO-3 gathered), the EMA applied when there is one, and the method's
        modules in eval mode: the state to sample or evaluate in."""
        params = list(self.model.backbone.parameters())
        for module in self.method_modules.values():
            params += list(module.parameters())
        with self.gathered(params), self.optimizer_evaluating():
            weights = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
            modes = [(m, m.training) for m in self.method_modules.values()]
            for m, _ in modes:
                m.eval()
            try:
                with weights:
                    yield
            finally:
                for m, mode in modes:
                    m.train(mode)

    @contextlib.contextmanager
    def optimizer_evaluating(self) -> Iterator[None]:
        """The weights at the optimizer's evaluation point (schedule-free optimizers train at another),
        back at its training point afterwards; a no-op for other optimizers and when already inside.
        Sampling, checkpoints and exports run inside it."""
        if self.optimizer_mode is None or self._optimizer_evaluating:
            yield
            return
        self.optimizer_mode(False)
        self._optimizer_evaluating = True
        try:
            yield
        finally:
            self._optimizer_evaluating = False
            self.optimizer_mode(True)

    @property
    def lr(self) -> float:
        if self.engine is None:
            return 0.0
        return float(self.engine.optimizer.param_groups[0]["lr"])
