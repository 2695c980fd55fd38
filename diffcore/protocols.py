"""The contracts between the kernel and plugins, as typing Protocols (docs/plugin-api.md).

Models and methods have base classes that declare every member with its default
(:class:`diffcore.model.DiffusionModel`, :class:`diffcore.method.Method`); the kernel calls those
members directly, never probing with ``getattr``. The protocols below are structural: a plugin
provides the attributes and methods, with or without subclassing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # typing only: importing this module must not import torch
    import torch

    from diffcore.diffusion.scheduler import SamplingSchedule
    from diffcore.method import Method as Method
    from diffcore.model import DiffusionModel as Model

PredictionType = Literal["eps", "v", "x0", "flow"]
Batch = Mapping[str, Any]


@runtime_checkable
class Scheduler(Protocol):
    """A noise schedule and its training objective (what the ``scheduler`` section builds).

    ``kind`` is "ddpm" (discrete timesteps, model time in [0, T)) or "flow" (sigma in [0, 1]).
    ``sample_t(n, generator, device, seq_len=None)`` draws n training times in model time
    (``seq_len``, the latent token count, drives resolution-dependent shifts).
    ``add_noise(x0, noise, t)`` -> noisy sample; ``target(x0, noise, t, prediction_type)`` -> what the
    model should output; ``loss_weight(t, prediction_type)`` -> per-sample weights (shape (n,)), used
    when the job names no ``train.loss_weighting``; ``alpha_sigma(t)`` -> (alpha, sigma) with
    x_t = alpha x0 + sigma noise (loss weightings derive SNR from it); ``noise_offset`` (float) is
    applied by the method. ``sampling_schedule(steps, sampler, seq_len=, karras=)`` -> the
    :class:`~diffcore.diffusion.scheduler.SamplingSchedule` a sampler walks at inference.
    """

    kind: Literal["ddpm", "flow"]
    noise_offset: float

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def sampling_schedule(
        self, steps: int, sampler: str = "euler", *, seq_len: int | None = None, karras: bool = False
    ) -> SamplingSchedule: ...

    def sample_t(
        self, n: int, generator: torch.Generator, device: torch.device, seq_len: int | None = None
    ) -> torch.Tensor: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: PredictionType
    ) -> torch.Tensor: ...

    def loss_weight(self, t: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor: ...


@runtime_checkable
class Adapter(Protocol):
    """An adapter built from the ``adapter`` section.

    ``attach(model)`` injects into ``model.backbone`` (and text encoders when configured), freezes the
    base weights and returns the parameters that train. ``save(path, fmt, metadata)`` writes
    safetensors with ``metadata`` in the header (``fmt`` None: the adapter's configured format; the
    adapter plugin owns its file naming, e.g. kohya's ``lora_unet_``); ``load(path)`` reads a saved
    file back into the attached modules; ``from_file(model, path, strength)`` applies a saved file to
    a model without a job (``diffcore sample --adapter``), sizes read from the file.
    """

    def attach(self, model: Model) -> list[torch.nn.Parameter]: ...

    def save(self, path: str | Path, fmt: str | None = None, metadata: Mapping[str, str] | None = None) -> None: ...

    def load(self, path: str | Path) -> None: ...

    def from_file(self, model: Model, path: str | Path, strength: float = 1.0) -> Any: ...


@runtime_checkable
class AppliedAdapter(Protocol):
    """What ``Adapter.from_file`` returns when ``diffcore convert`` uses it: the file's adapter on a
    model. ``save(path, fmt)`` writes it in another file format (kohya <-> PEFT); ``merge()`` folds
    it into the model's weights at the strength it was applied with and ``detach()`` then takes the
    adapter's own modules out, leaving the merged weights (``convert --merge``)."""

    def save(self, path: str | Path, fmt: str | None = None, metadata: Mapping[str, str] | None = None) -> None: ...

    def merge(self) -> None: ...

    def detach(self) -> None: ...


@runtime_checkable
class Dataset(Protocol):
    """A map-style dataset of examples.

    ``__getitem__(i)`` returns a dict: ``pixels`` (CHW float in [-1, 1]) or ``latents``, and any of
    ``captions`` (str), ``labels`` (int), ``mask``, ``control``, ``reference``. Optional:
    ``bucket(i) -> hashable``: examples of one batch share a bucket (same shapes);
    indices arrive as ``diffcore.data.sampler.EpochIndex`` (an int with ``.epoch``) so random augmentations can be seeded from (seed, epoch, index); ``class_names: list[str]``.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class Autoencoder(Protocol):
    """An image autoencoder as latent architectures use it.

    ``encode(pixels, sample=False, generator=None)`` -> normalised latents (scale and shift applied);
    ``decode(latents)`` -> pixels in [-1, 1]; ``latent_channels``; ``downscale`` (pixels per latent);
    ``module``: the torch module (frozen during training); ``to(device)`` moves it (keeping the
    precision it needs, e.g. fp32 for an SDXL VAE asked for fp16).
    """

    latent_channels: int
    downscale: int
    module: torch.nn.Module

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any: ...

    def encode(
        self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
