"""A fake :class:`~diffcore.context.TrainContext` for unit-testing a method without DeepSpeed, and
the tiny model it uses by default."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcore.context import StepRandom, TrainContext
from diffcore.method import Method
from diffcore.model import DiffusionModel
from diffcore.nn import timestep_embedding


class TinyNet(nn.Module):
    """A class-conditional conv denoiser of a few thousand parameters."""

    def __init__(self, channels: int = 3, width: int = 16, num_classes: int = 4):
        super().__init__()
        self.width = width
        self.label_emb = nn.Embedding(num_classes + 1, width)  # the last row is the null class
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.width).to(x.dtype)) + self.label_emb(labels)
        h = torch.nn.functional.silu(self.conv_in(x) + emb[:, :, None, None])
        return self.conv_out(h + torch.nn.functional.silu(self.conv_mid(h)))


class TinyModel(DiffusionModel):
    """A pixel-space, class-conditional eps model on :class:`TinyNet` (batches without ``labels``
    get the null class)."""

    default_scheduler = {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}

    def __init__(self, channels: int = 3, width: int = 16, num_classes: int = 4):
        super().__init__(TinyNet(channels, width, num_classes), latent_channels=channels)
        self.null_label = num_classes
        self.architecture = "testing-tiny"

    def encode_conditions(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if "labels" in batch:
            return torch.as_tensor(batch["labels"], device=self.device).long()
        n = len(batch["captions"]) if "captions" in batch else int(batch["pixels"].shape[0])
        return torch.full((n,), int(self.null_label or 0), device=self.device, dtype=torch.long)

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: Any, **extra: Any) -> torch.Tensor:
        return self.backbone(noisy_latents.to(self.dtype), t.to(self.device).float(), cond)


def first_batch(dataset: Any, n: int = 4) -> dict[str, Any]:
    """The first ``n`` examples of ``dataset`` collated as the loop collates a micro-batch."""
    from diffcore.data.collate import collate

    return collate([dataset[i] for i in range(n)])


def fake_context(
    model: DiffusionModel | None = None,
    *,
    method: Method | None = None,
    scheduler: Any = None,
    dataset: Any = None,
    train: Mapping[str, Any] | None = None,
    seed: int = 0,
    micro_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    output_dir: str | Path | None = None,
    adapter: Any = None,
) -> TrainContext:
    """A :class:`TrainContext` as the loop builds it, on CPU and without DeepSpeed (``engine`` is None).

    ``model`` defaults to a :class:`TinyModel`; ``method`` to the built-in diffusion method;
    ``scheduler`` (a built scheduler, or a registered name) to the model's ``default_scheduler``;
    ``dataset`` to 16 synthetic 8x8 shapes; ``train`` holds ``train:`` section keys. As in the loop,
    ``adapter`` (a built adapter) is attached to the model first and becomes
    ``ctx.adapter`` with ``ctx.adapter_params``; then ``method.modules(model)`` become
    ``ctx.method_modules`` and ``ctx.trainable`` is what ``method.setup`` returns plus their
    parameters. ``ctx.step_random`` draws micro-step ``micro_step`` of rank ``rank`` in a world of
    ``world_size``; assign a new :class:`~diffcore.context.StepRandom` to move on. Nothing is written
    unless the code under test writes to ``output_dir`` (default: a fresh temporary folder).
    """
    from diffcore.api import build_component
    from diffcore.config.job import Job, Section, TrainConfig
    from diffcore.config.structure import structure

    model = model if model is not None else TinyModel()
    if scheduler is None or isinstance(scheduler, str):
        options = dict(model.default_scheduler)
        name = options.pop("type")
        if scheduler is not None and scheduler != name:
            name, options = scheduler, {}
        scheduler = build_component("scheduler", name, options)
    if method is None:
        from diffcore.methods.config import DiffusionMethodConfig
        from diffcore.methods.diffusion import DiffusionMethod

        method = DiffusionMethod(DiffusionMethodConfig())
    if dataset is None:
        dataset = build_component("dataset", "synthetic", {"resolution": 8, "size": 16})
    job = Job(
        name="fake",
        output_dir=str(output_dir or ""),
        seed=seed,
        model=Section(type=model.architecture or type(model).__name__, config=None),
        method=Section(type=type(method).__name__, config=None),
        data=Section(type=type(dataset).__name__, config=None),
        train=structure(dict(train or {}), TrainConfig, "$.train"),
    )
    ctx = TrainContext(
        job=job,
        model=model,
        scheduler=scheduler,
        method=method,
        dataset=dataset,
        output_dir=Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="diffcore-ctx-")),
        device=model.device,
        rank=rank,
        world_size=world_size,
        step_random=StepRandom(seed, micro_step, rank, world_size),
    )
    if adapter is not None:
        ctx.adapter = adapter
        ctx.adapter_params = list(adapter.attach(model))
    ctx.method_modules = dict(method.modules(model))
    trainable = [p for p in method.setup(ctx) if p.requires_grad]
    trainable += [p for m in ctx.method_modules.values() for p in m.parameters() if p.requires_grad]
    ctx.trainable = list({id(p): p for p in trainable}.values())
    return ctx
