"""A base class for model plugins that implements the common parts of the model protocol.

Plugins may use it (it is public API) or provide the protocol themselves. It holds the trainable
``backbone``, an optional frozen ``autoencoder`` (None = pixel space) and named frozen modules
(text encoders), and moves them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class DiffusionModel:
    """Common model-protocol plumbing; subclasses implement ``encode_conditions`` and ``predict``."""

    prediction_type: str = "eps"
    #: the class index meaning "no class" for classifier-free guidance (class-conditional models)
    null_label: int | None = None
    #: distilled-guidance models take the guidance scale as ``predict(..., guidance=g)``
    guidance_embedded: bool = False
    #: module-name regexes an adapter wraps when the job names none
    adapter_targets: list[str] = []

    def __init__(
        self,
        backbone: nn.Module,
        *,
        autoencoder: Any = None,
        frozen: Mapping[str, nn.Module] | None = None,
        latent_channels: int | None = None,
    ):
        self.backbone = backbone
        self.autoencoder = autoencoder
        self.frozen: dict[str, nn.Module] = dict(frozen or {})
        self._latent_channels = latent_channels
        for module in self.frozen.values():
            module.requires_grad_(False).eval()
        if autoencoder is not None:
            getattr(autoencoder, "module", autoencoder).requires_grad_(False)

    # -- placement -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move the backbone (and cast it when ``dtype`` is given) and move the frozen parts with it."""
        self.backbone.to(device=device, dtype=dtype)
        for module in self.frozen.values():
            module.to(device=device)
        if self.autoencoder is not None:
            ae = self.autoencoder
            target = ae if hasattr(ae, "to") else ae.module
            target.to(device)
        return self

    # -- latents ---------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        if self.autoencoder is not None:
            return self.autoencoder.latent_channels
        if self._latent_channels is None:
            raise AttributeError("latent_channels unknown: pass latent_channels= to DiffusionModel")
        return self._latent_channels

    @property
    def latent_downscale(self) -> int:
        return self.autoencoder.downscale if self.autoencoder is not None else 1

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return pixels
        return self.autoencoder.encode(pixels)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return latents
        return self.autoencoder.decode(latents)

    # -- conditioning ----------------------------------------------------------------------------
    def null_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with its conditioning dropped: empty captions, the null class."""
        out = dict(batch)
        if "captions" in out:
            out["captions"] = [""] * len(out["captions"])
        if "labels" in out and self.null_label is not None:
            labels = out["labels"]
            out["labels"] = torch.full_like(torch.as_tensor(labels), self.null_label)
        return out

    def encode_conditions(self, batch: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: Any, **extra: Any) -> torch.Tensor:
        raise NotImplementedError

    # -- training knobs --------------------------------------------------------------------------
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn per-block activation checkpointing on for backbones that support it."""
        if hasattr(self.backbone, "gradient_checkpointing"):
            self.backbone.gradient_checkpointing = enabled
        else:
            raise NotImplementedError(f"{type(self.backbone).__name__} has no activation checkpointing")

    def adapter_key(self, module_path: str, fmt: str) -> str | None:
        """The name of backbone module ``module_path`` in an adapter file of format ``fmt``."""
        if fmt == "kohya":
            return "lora_unet_" + module_path.replace(".", "_")
        return module_path

    def export_state_dict(self, layout: str = "diffusers") -> dict[str, torch.Tensor]:
        """The backbone's weights in a published layout; subclasses convert for "original"."""
        return {k: v.detach() for k, v in self.backbone.state_dict().items()}
