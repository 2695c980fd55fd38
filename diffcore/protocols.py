"""The objects that plugin factories return, as typing Protocols.

These are the contracts between the kernel and plugins. They are structural: a plugin does not
subclass them, it provides the attributes and methods. Optional members are marked as such; the
kernel checks for them with ``getattr``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # typing only: importing this module must not import torch
    import torch

    from diffcore.training.context import TrainContext

PredictionType = Literal["eps", "v", "x0", "flow"]
Batch = Mapping[str, Any]


@runtime_checkable
class Model(Protocol):
    """What a model plugin's factory returns (DESIGN.md, "Model protocol").

    Required:
      backbone            the torch.nn.Module that trains (UNet, DiT, MMDiT...)
      prediction_type     "eps", "v", "x0" or "flow"
      encode_images(pixels in [-1, 1], BCHW) -> latents as the backbone sees them
      decode_latents(latents) -> pixels in [-1, 1]
      encode_conditions(batch) -> whatever ``predict`` takes as ``cond``
      predict(noisy_latents, t, cond, **extra) -> output in ``prediction_type``;
                          ``t`` is float model time: [0, T) for DDPM-family, sigma in [0, 1] for flow.
                          ``predict`` casts its inputs to the backbone's dtype; the caller casts the
                          output to float32 for the loss.

    Optional (the kernel uses them when present):
      latent_channels: int, latent_downscale: int   latent shape for sampling from pixel size
      null_batch(batch) -> batch         the same batch with conditioning dropped (empty captions,
                                         the null class), for classifier-free guidance and dropout
      guidance_embedded: bool            distilled guidance passed as ``predict(..., guidance=g)``
      default_scheduler: dict            the scheduler section a job gets when it gives none
      adapter_targets: list[str]         module-name regexes an adapter wraps by default
      adapter_key(module_path, fmt) -> str | None
                                         the name of a backbone module in a saved adapter file:
                                         fmt "kohya" -> "lora_unet_..."; fmt "peft" -> diffusers path
      set_gradient_checkpointing(enabled: bool)
      export_state_dict(layout="diffusers"|"original") -> dict[str, Tensor]
                                         the backbone's weights in a published layout (the loop
                                         exports "diffusers" as model.safetensors)
      load_exported(tensors)             the inverse: fill the backbone from that export
                                         (``diffcore sample --from`` uses it)
      trainable_modules() -> dict[str, nn.Module] extra modules (text encoders) a method may train
      to(device, dtype) and the frozen parts (autoencoder, text encoders) follow the backbone's device
    """

    backbone: torch.nn.Module
    prediction_type: PredictionType

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode_conditions(self, batch: Batch) -> Any: ...

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: Any, **extra: Any) -> torch.Tensor: ...


@runtime_checkable
class Scheduler(Protocol):
    """A noise schedule and its training objective (what the ``scheduler`` section builds).

    ``kind`` is "ddpm" (discrete timesteps, model time in [0, T)) or "flow" (sigma in [0, 1]).
    ``sample_t(n, generator, device, seq_len=None)`` draws n training times in model time
    (``seq_len``, the latent token count, drives resolution-dependent shifts).
    ``add_noise(x0, noise, t)`` -> noisy sample; ``target(x0, noise, t, prediction_type)`` -> what the
    model should output; ``loss_weight(t, prediction_type)`` -> per-sample weights (shape (n,)).
    ``noise_offset`` (float) and ``input_perturbation`` are applied by the method.
    """

    kind: Literal["ddpm", "flow"]

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
    base weights and returns the parameters that train. ``state_dict(fmt)`` gives the saved tensors
    ("kohya" default, or "peft"); ``save(path, fmt, metadata)`` writes safetensors with metadata;
    ``load(path)`` reads either format back into the attached modules.
    """

    def attach(self, model: Model) -> list[torch.nn.Parameter]: ...

    def save(self, path: str | Path, fmt: str = "kohya", metadata: Mapping[str, str] | None = None) -> None: ...

    def load(self, path: str | Path) -> None: ...


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


class Method(Protocol):
    """How a batch becomes a loss (the ``method`` section).

    ``setup(ctx)`` chooses what trains (returns the parameters; an adapter's when one is attached)
    and may add modules; ``loss(ctx, batch)`` returns (scalar loss, dict of floats to log).
    """

    def setup(self, ctx: TrainContext) -> Iterable[torch.nn.Parameter]: ...

    def loss(self, ctx: TrainContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...


class Autoencoder(Protocol):
    """An image autoencoder as latent architectures use it.

    ``encode(pixels, sample=False, generator=None)`` -> normalised latents (scale and shift applied);
    ``decode(latents)`` -> pixels in [-1, 1]; ``latent_channels``; ``downscale`` (pixels per latent);
    ``module``: the torch module (frozen during training).
    """

    latent_channels: int
    downscale: int

    def encode(
        self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
