"""The model contract: every member the kernel uses, declared here with its default.

A model plugin's factory returns a :class:`DiffusionModel` (a subclass). The kernel calls these members
directly and never probes for them; a subclass overrides what its architecture does differently.
docs/plugin-api.md describes each member. The base holds the trainable ``backbone``, an optional
frozen ``autoencoder`` (None = pixel space) and named frozen modules (text encoders), and moves them
together.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import nn

from diffcore.control import ControlTrunk
from diffcore.errors import UserError
from diffcore.weights import load_into

PredictionType = Literal["eps", "v", "x0", "flow"]
#: what :meth:`DiffusionModel.adapter_key` returns for the diffusers layout: one module path, or for a
#: fused module (Flux's qkv) the diffusers modules it holds, each with the rows of the output it owns
#: (a row count following the previous part, a (start, stop) pair, or None for "the rest")
FusedParts = list[tuple[str, int | tuple[int, int] | None]]
AdapterKey = str | FusedParts | None


@attrs.frozen(eq=False)
class TokenTable:
    """One text encoder's tokenizer and its token-embedding table (what textual inversion extends:
    it adds tokens to ``tokenizer`` and looks their vectors up beside ``embedding``'s rows)."""

    #: a transformers tokenizer (``add_tokens``, ``convert_tokens_to_ids``, ``__call__``)
    tokenizer: Any
    #: the ``nn.Embedding`` the encoder looks token ids up in
    embedding: nn.Embedding


class DiffusionModel:
    """The model contract with its defaults; subclasses implement ``encode_conditions`` and ``predict``."""

    #: what ``predict`` returns: "eps", "v", "x0" or "flow"
    prediction_type: PredictionType = "eps"
    #: the class index meaning "no class" for classifier-free guidance (class-conditional models)
    null_label: int | None = None
    #: distilled-guidance models take the guidance scale as ``predict(..., guidance=g)``
    guidance_embedded: bool = False
    #: the guidance value such a model is trained with (Flux dev: 1.0 in kohya and diffusion-pipe)
    train_guidance: float = 1.0
    #: ``predict(..., skip_layers=[block indices])`` passes those blocks over (skip-layer guidance,
    #: the sampler option ``skip_layers``); False: the model takes no such keyword
    layer_skipping: bool = False
    #: module-name regexes an adapter wraps when the job names none
    adapter_targets: list[str] = []
    #: the diffusers component the backbone is published as ("unet", "transformer"): adapter files in
    #: the PEFT/diffusers layout prefix module names with it
    diffusers_component: str = "transformer"
    #: the registered architecture name (set by the kernel when it builds the model) and where the
    #: weights came from (the plugin sets its ``pretrained`` path; "" for random init): adapter and
    #: model files record both in their headers
    architecture: str = ""
    base_model: str = ""
    #: the scheduler section a job gets when it names none (``{"type": ..., **options}``)
    default_scheduler: dict[str, Any] = {"type": "ddpm"}
    #: a latent-space model whose autoencoder may be left unloaded (a data cache, a transformer-only
    #: path) sets where to point at one: encoding or decoding without it is then that error, instead
    #: of pixels passing through as if they were latents. None: no autoencoder means pixel space.
    autoencoder_hint: str | None = None

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
            autoencoder.module.requires_grad_(False)

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
            self.autoencoder.to(device)
        return self

    # -- latents ---------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the latents ``predict`` takes (the sampler draws its start noise with them)."""
        if self.autoencoder is not None:
            return self.autoencoder.latent_channels
        if self._latent_channels is None:
            raise NotImplementedError(f"{type(self).__name__}: pass latent_channels= to DiffusionModel")
        return self._latent_channels

    @property
    def latent_downscale(self) -> int:
        """Pixels per latent position along each side."""
        return self.autoencoder.downscale if self.autoencoder is not None else 1

    def sequence_length(self, latents: torch.Tensor) -> int:
        """Tokens the backbone sees for ``latents`` (drives resolution-dependent flow shifts).

        The default counts latent positions; patchifying models divide by the patch area."""
        return int(latents.shape[-2]) * int(latents.shape[-1])

    def _require_autoencoder(self) -> None:
        if self.autoencoder is None and self.autoencoder_hint is not None:
            name = self.architecture or type(self).__name__
            raise UserError(f"this {name} model has no autoencoder loaded", where="$.model.vae", hint=self.autoencoder_hint)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], BCHW -> latents as the backbone sees them (scale and shift applied)."""
        self._require_autoencoder()
        if self.autoencoder is None:
            return pixels
        return self.autoencoder.encode(pixels)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        self._require_autoencoder()
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
        """A batch (``captions``, ``labels``, extra inputs) -> what ``predict`` takes as ``cond``."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_conditions")

    def complete_conditions(self, cond: Any, batch: Mapping[str, Any]) -> Any:
        """``cond`` read from the text cache, completed with what the batch's image inputs give
        (reference images, an inpainting mask) as ``encode_conditions`` would add them; the default
        model has none and returns ``cond``."""
        return cond

    def predict(self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: Any, **extra: Any) -> torch.Tensor:
        """The backbone's output in ``prediction_type``; ``t`` in the model's own training time."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict")

    # -- training knobs --------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Every module a method may unfreeze, by name: the backbone and the text encoders.

        The kernel hands the ones holding trainable parameters to DeepSpeed together with the
        method's own modules, so clipping, ZeRO and checkpoints cover them."""
        return {"backbone": self.backbone, **self.frozen}

    def token_tables(self) -> dict[str, TokenTable]:
        """Each loaded text encoder's tokenizer and token embeddings, by the name embedding files
        give that encoder (``"clip_l"``, ``"clip_g"``); empty (the default) when the model has none,
        and textual inversion refuses it."""
        return {}

    def repeated_blocks(self) -> list[str]:
        """Dotted paths of the backbone's ``nn.ModuleList``s of repeated blocks (for block swap,
        regional compile and checkpointing); empty when the backbone declares none."""
        return []

    def flops_per_sample(self, latents: torch.Tensor) -> float | None:
        """Forward FLOPs of one sample shaped like ``latents[0]`` (for MFU); None when unknown."""
        return None

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn per-block activation checkpointing on; the default says the backbone has none."""
        raise UserError(
            f"{type(self.backbone).__name__} has no activation checkpointing",
            where="$.train.gradient_checkpointing",
            hint="set it to false for this model",
        )

    def control_trunk(self, options: Mapping[str, Any]) -> ControlTrunk:
        """A trainable copy of the front of the backbone that a ControlNet runs (see
        :mod:`diffcore.control`); ``predict`` then takes the residuals it names. ``options`` are the
        published ControlNet config's keys (e.g. Flux's ``num_layers``), from a saved config.json or
        the method's section. The default: this model takes no ControlNet residuals."""
        raise UserError(
            f"{type(self).__name__} takes no ControlNet residuals",
            where="$.model.type",
            hint="use a model whose plugin supports ControlNet (sd15, sd21, sdxl, flux)",
        )

    # -- adapters and export ---------------------------------------------------------------------
    def adapter_key(self, module_path: str, layout: Literal["original", "diffusers"]) -> AdapterKey:
        """The name of backbone module ``module_path`` in a published layout, for adapter files.

        "original": the module's name in the original checkpoint (kohya files build on it); "diffusers":
        its diffusers path or, for a fused module, the list of parts (PEFT files). None: the module has
        no counterpart there and adapters skip it. The default: the backbone's names are both.
        """
        return module_path

    def text_encoder_key(self, name: str, layout: Literal["original", "diffusers"]) -> str:
        """The name of text encoder ``name`` (a key of ``frozen``) in a published layout, for adapter files.

        "original": its name in kohya/ComfyUI adapter files (``lora_<name>_...``), which number text
        encoders by kind (te1 CLIP-L, te2 CLIP-G, te3 T5); "diffusers": its diffusers pipeline
        component (PEFT files). The default: ``teN`` is ``teN`` and ``text_encoder`` /
        ``text_encoder_N``; other names are their own.
        """
        if layout == "diffusers" and name.startswith("te") and name[2:].isdigit():
            return "text_encoder" if name == "te1" else f"text_encoder_{name[2:]}"
        return name

    def export_state_dict(self, layout: Literal["original", "diffusers"] = "diffusers") -> dict[str, torch.Tensor]:
        """The backbone's weights in a published layout (the loop exports "diffusers" as
        ``model.safetensors``); the default is the backbone's own state dict."""
        return {k: v.detach() for k, v in self.backbone.state_dict().items()}

    def load_exported(self, tensors: Mapping[str, torch.Tensor], where: str = "model.safetensors") -> None:
        """The inverse of ``export_state_dict("diffusers")``: fill the backbone from that export
        (``diffcore sample --from`` uses it). The default loads by the backbone's own names."""
        load_into(self.backbone, tensors, where=where, device=self.device, dtype=self.dtype)

    def save_pretrained(self, path: str | Path, layout: Literal["original", "diffusers"] = "diffusers") -> Path:
        """Write the model as a published file: the diffusers folder (``"diffusers"``) or the
        original single file (``"original"``; ``path`` itself when it ends in ``.safetensors``).
        Returns what was written. ``diffcore convert`` uses it; the default says this architecture
        cannot convert."""
        raise UserError(
            f"{type(self).__name__} ({self.architecture or 'this architecture'}) cannot write its published layouts",
            where="diffcore convert",
            hint="its plugin does not implement save_pretrained; convert with the tools of its own project",
        )
