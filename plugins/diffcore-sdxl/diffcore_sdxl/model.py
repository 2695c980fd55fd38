"""The SD/SDXL model object: UNet backbone, frozen CLIP text encoders, autoencoder, and the layouts
it loads from and saves to."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import diffcore
from diffcore.control import ControlTrunk
from diffcore.errors import UserError
from diffcore.model import DiffusionModel, TokenTable
from diffcore.text_encoders import grad_if_trainable
from diffcore.weights import Checkpoint, has_prefix, save_safetensors
from diffcore_sdxl import loading
from diffcore_sdxl.config import SDConfig, UNetConfig
from diffcore_sdxl.convert import (
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    hf_to_openclip,
    unet_name_to_original,
)
from diffcore_sdxl.flops import forward_flops
from diffcore_sdxl.network import UNet
from diffcore_sdxl.text import encode_windows, tokenize_windows, window_count

_DEFAULT_SCHEDULER = {
    "type": "ddpm",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
}
_PIPELINES = {
    "sdxl": "StableDiffusionXLPipeline",
    "sd15": "StableDiffusionPipeline",
    "sd21": "StableDiffusionPipeline",
}
# the spatial-transformer layers kohya's LoRA trains in the UNet
_ADAPTER_TARGETS = [
    r"(.*\.)?attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    r"(.*\.)?attentions\.\d+\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$",
    r"(.*\.)?attentions\.\d+\.proj_(in|out)$",
]


class SDModel(DiffusionModel):
    """Stable Diffusion 1.x/2.x or SDXL: ``backbone`` is the UNet, ``frozen`` holds the text
    encoders (``te1``, and ``te2`` for SDXL)."""

    adapter_targets = _ADAPTER_TARGETS
    diffusers_component = "unet"

    def __init__(
        self,
        config: SDConfig,
        unet: UNet,
        text_encoders: Mapping[str, torch.nn.Module],
        tokenizers: Mapping[str, Any],
        autoencoder: Any = None,
    ):
        super().__init__(
            unet, autoencoder=autoencoder, frozen=text_encoders, latent_channels=unet.config.in_channels
        )
        self.config = config
        self.base_model = str(config.pretrained or "")
        self.family = config.FAMILY
        self.prediction_type = config.prediction_type
        self.tokenizers = dict(tokenizers)
        self.default_scheduler = dict(_DEFAULT_SCHEDULER)
        if config.gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    @property
    def unet_config(self) -> UNetConfig:
        return self.backbone.config

    @property
    def latent_downscale(self) -> int:
        return self.autoencoder.downscale if self.autoencoder is not None else 8

    # -- conditioning --------------------------------------------------------------------------------
    def _encode(
        self, slot: str, captions: Sequence[str], windows: int, layer: str
    ) -> tuple[torch.Tensor, Any]:
        encoder = self.frozen[slot]
        ids = tokenize_windows(self.tokenizers[slot], captions, min_windows=windows)
        with grad_if_trainable(encoder):  # a text-encoder adapter trains through it
            return encode_windows(encoder, ids, layer)

    def token_tables(self) -> dict[str, TokenTable]:
        """The CLIP tokenizers and token embeddings: ``clip_l`` (SD1.x, and SDXL's first encoder),
        ``clip_h`` (SD2.x's OpenCLIP ViT-H), ``clip_g`` (SDXL's OpenCLIP bigG); empty when the
        text encoders were not loaded."""
        names = {"sd15": ("clip_l",), "sd21": ("clip_h",), "sdxl": ("clip_l", "clip_g")}[self.family]
        return {
            name: TokenTable(self.tokenizers[slot], self.frozen[slot].get_input_embeddings())
            for name, slot in zip(names, ("te1", "te2"))
            if slot in self.frozen and self.tokenizers.get(slot) is not None
        }

    def encode_conditions(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``captions`` -> ``context`` (B, L, D); SDXL adds ``pooled`` (B, 1280) and ``time_ids``
        (B, 6) from ``original_size``/``crop_coords``/``target_size`` (default: the batch's image
        size, no crop)."""
        captions = batch.get("captions")
        if captions is None:
            raise UserError("this model is conditioned on captions; the batch has none", where="batch")
        captions = [captions] if isinstance(captions, str) else list(captions)
        device, dtype = self.device, self.dtype
        if self.family != "sdxl":
            context, _ = self._encode("te1", captions, 1, "last")
            return {"context": context.to(device, dtype)}
        windows = max(window_count(self.tokenizers[s], captions) for s in ("te1", "te2"))
        h1, _ = self._encode("te1", captions, windows, "penultimate")
        h2, pooled = self._encode("te2", captions, windows, "penultimate")
        context = torch.cat([h1.to(device, dtype), h2.to(device, dtype)], dim=-1)
        return {
            "context": context,
            "pooled": pooled.to(device, dtype),
            "time_ids": self._time_ids(batch, len(captions)),
        }

    def _image_size(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        if "pixels" in batch and torch.is_tensor(batch["pixels"]):
            return tuple(batch["pixels"].shape[-2:])
        if "latents" in batch and torch.is_tensor(batch["latents"]):
            h, w = batch["latents"].shape[-2:]
            return h * self.latent_downscale, w * self.latent_downscale
        return self.config.resolution, self.config.resolution

    def _time_ids(self, batch: Mapping[str, Any], n: int) -> torch.Tensor:
        size = self._image_size(batch)

        def column(key: str, default: tuple[int, int]) -> torch.Tensor:
            value = batch.get(key)
            value = torch.as_tensor(default if value is None else value, dtype=torch.float32)
            if value.ndim == 1:
                value = value.expand(n, 2)
            if tuple(value.shape) != (n, 2):
                raise UserError(
                    f"expected (height, width) pairs, one per caption, got {tuple(value.shape)}", where=key
                )
            return value

        parts = [column("original_size", size), column("crop_coords", (0, 0)), column("target_size", size)]
        return torch.cat(parts, dim=1).to(self.device, self.dtype)

    def predict(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        down_block_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_residual: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        dtype, device = self.dtype, self.device
        cast = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
        t = torch.as_tensor(t, device=device, dtype=torch.float32)
        return self.backbone(
            cast(noisy_latents),
            t,
            cast(cond["context"]),
            pooled=cast(cond.get("pooled")),
            time_ids=cast(cond.get("time_ids")),
            down_block_residuals=None
            if down_block_residuals is None
            else [cast(r) for r in down_block_residuals],
            mid_block_residual=cast(mid_block_residual),
        )

    def control_trunk(self, options: Mapping[str, Any]) -> ControlTrunk:
        """A ControlNet trunk copied from the UNet (diffusers ``ControlNetModel`` layout)."""
        from diffcore_sdxl.control import unet_trunk

        return unet_trunk(self.backbone, options)

    # -- adapters and layouts --------------------------------------------------------------------
    def adapter_key(self, module_path: str, layout: str) -> str | None:
        """original: the SGM module name (kohya files build on it); diffusers: the module path."""
        if layout != "original":
            return module_path
        return unet_name_to_original(module_path, self.unet_config)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.backbone.gradient_checkpointing = enabled

    def repeated_blocks(self) -> list[str]:
        """Every ``transformer_blocks`` list (diffusers' ``BasicTransformerBlock``, the repeated
        unit it compiles regionally too): they hold most of an SDXL UNet's weights and time."""
        return [
            name
            for name, module in self.backbone.named_modules()
            if name.endswith("transformer_blocks") and isinstance(module, torch.nn.ModuleList)
        ]

    def flops_per_sample(self, latents: torch.Tensor) -> float | None:
        """Convolution and matmul FLOPs of one UNet forward (attention included, one 77-token caption
        window), counted from the UNet's layers at the resolutions they run at."""
        return float(forward_flops(self.backbone, int(latents.shape[-2]), int(latents.shape[-1])))

    def export_state_dict(self, layout: str = "diffusers") -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in self.backbone.state_dict().items()}
        if layout == "diffusers":
            return state
        if layout == "original":
            return {UNET_PREFIX + unet_name_to_original(k, self.unet_config): v for k, v in state.items()}
        raise UserError(f"unknown weights layout {layout!r}", hint="use 'diffusers' or 'original'")

    def _text_state(self, slot: str) -> dict[str, torch.Tensor]:
        prefix, openclip = TEXT_PREFIXES[self.family][slot]
        state = loading.canonical_clip_state(self.frozen[slot])
        if openclip:
            state = hf_to_openclip(state)
        return {prefix + k: v for k, v in state.items()}

    def _autoencoder_original(self) -> dict[str, torch.Tensor]:
        ae = self.autoencoder
        if ae is None or not hasattr(ae, "save"):
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            file = ae.save(Path(tmp) / "vae.safetensors", "original")
            return {VAE_PREFIX + k: v.clone() for k, v in Checkpoint(file).items()}

    def save_pretrained(self, path: str | Path, layout: str = "diffusers") -> Path:
        """Save the whole model: a diffusers pipeline folder, or (``original``) one single
        ``.safetensors`` file (``path`` itself if it ends in ``.safetensors``, else
        ``path/model.safetensors``). Returns what was written."""
        path = Path(path)
        if layout == "original":
            file = path if path.suffix == ".safetensors" else path / "model.safetensors"
            tensors = self.export_state_dict("original")
            for slot in self.frozen:
                tensors.update(self._text_state(slot))
            tensors.update(self._autoencoder_original())
            meta = {"diffcore.family": self.family}
            if self.family == "sd21" and "te1" in self.frozen:  # a UNet-only model has none to describe
                meta[loading.SD2_LAYERS_KEY] = str(self.frozen["te1"].config.num_hidden_layers)
            save_safetensors(tensors, file, metadata=meta)
            return file
        if layout != "diffusers":
            raise UserError(f"unknown weights layout {layout!r}", hint="use 'diffusers' or 'original'")
        path.mkdir(parents=True, exist_ok=True)
        (path / "unet").mkdir(exist_ok=True)
        sample = self.config.resolution // self.latent_downscale
        (path / "unet" / "config.json").write_text(
            json.dumps(self.unet_config.to_diffusers(sample), indent=2)
        )
        save_safetensors(
            self.export_state_dict("diffusers"), path / "unet" / "diffusion_pytorch_model.safetensors"
        )
        index: dict[str, Any] = {"_class_name": _PIPELINES[self.family]}
        for slot, name in (("te1", ""), ("te2", "_2")):
            if slot not in self.frozen:
                continue
            encoder = self.frozen[slot]
            encoder.config.save_pretrained(path / f"text_encoder{name}")
            save_safetensors(
                loading.canonical_clip_state(encoder), path / f"text_encoder{name}" / "model.safetensors"
            )
            self.tokenizers[slot].save_pretrained(str(path / f"tokenizer{name}"))
            index[f"text_encoder{name}"] = ["transformers", type(encoder).__name__]
            index[f"tokenizer{name}"] = ["transformers", "CLIPTokenizer"]
        if self.autoencoder is not None and hasattr(self.autoencoder, "save"):
            self.autoencoder.save(path / "vae", "diffusers")
            index["vae"] = ["diffusers", "AutoencoderKL"]
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        return path


# -- building ------------------------------------------------------------------------------------
def _slots(family: str) -> list[str]:
    return ["te1", "te2"] if family == "sdxl" else ["te1"]


def _tokenizers(config: SDConfig, folder: Path | None) -> dict[str, Any]:
    family = config.FAMILY
    out = {}
    for slot, sub, option in (("te1", "tokenizer", "tokenizer"), ("te2", "tokenizer_2", "tokenizer_2")):
        if slot not in _slots(family):
            continue
        # SDXL's second tokenizer pads with "!" (id 0); the released tokenizer_2 folder says so itself
        given = getattr(config, option, None)
        path = Path(given) if given else (folder / sub if folder is not None else None)
        if path is None or not path.is_dir():
            raise UserError(
                f"no {sub} found: a single-file or random-init model needs the CLIP tokenizer files",
                where=f"$.model.{option}",
                hint=f"set model.{option} to a folder holding the tokenizer (e.g. a pipeline's {sub}/)",
            )
        out[slot] = loading.load_tokenizer(path)
    return out


def build_model(config: SDConfig) -> SDModel:
    """Build from ``config.pretrained`` (diffusers folder or single file) or at random."""
    family = config.FAMILY
    dtype = loading.dtype_of(config)
    # training from a complete latent/text cache needs neither the text encoders nor the autoencoder
    slots = _slots(family) if config.load_encoders else []
    overrides = {"te1": config.text_encoder, "te2": getattr(config, "text_encoder_2", {})}
    source = Path(config.pretrained) if config.pretrained else None
    if source is not None and not source.exists():
        raise UserError("no such file or folder", where="$.model.pretrained")

    if source is None:
        unet_cfg = loading.preset_unet(family, config.unet)
        loading.check_unet(unet_cfg, None)
        unet = loading.load_unet(unet_cfg, None, original=False, where="random")
        encoders = {s: loading.random_text_encoder(family, s, overrides[s]) for s in slots}
        tokenizers = _tokenizers(config, None) if slots else {}
    elif source.is_dir():
        if not (source / "unet").is_dir():
            raise UserError(
                "not a diffusers pipeline folder (no unet/ inside)",
                where=str(source),
                hint="point model.pretrained at the pipeline folder or at a single .safetensors file",
            )
        raw = json.loads((source / "unet" / "config.json").read_text())
        unet_cfg = loading._evolve(
            UNetConfig.from_diffusers(raw, str(source / "unet")), config.unet, "$.model.unet"
        )
        loading.check_unet(unet_cfg, str(source / "unet" / "config.json"))
        unet = loading.load_unet(
            unet_cfg, Checkpoint(source / "unet"), original=False, where=str(source / "unet")
        )
        encoders = {}
        for slot in slots:
            sub = source / ("text_encoder" if slot == "te1" else "text_encoder_2")
            encoders[slot] = loading.folder_text_encoder(sub, slot, overrides[slot], dtype)
        tokenizers = _tokenizers(config, source) if slots else {}
    else:
        ckpt = Checkpoint(source)
        if not has_prefix(ckpt, UNET_PREFIX):
            raise UserError(
                f"no UNet weights ({UNET_PREFIX}*) in this file",
                where=str(source),
                hint=f"is it a {family} checkpoint?",
            )
        encoders = {s: loading.single_file_text_encoder(ckpt, family, s, overrides[s], dtype) for s in slots}
        pooled = None
        if family == "sdxl":
            projection = loading.TEXT_PREFIXES[family]["te2"][0] + "text_projection"
            pooled = ckpt.get(projection).shape[1] if projection in ckpt else encoders["te2"].config.projection_dim
        unet_cfg = loading.infer_unet(ckpt, family, config.unet, pooled)
        loading.check_unet(unet_cfg, str(source))
        unet = loading.load_unet(unet_cfg, ckpt, original=True, where=str(source))
        tokenizers = _tokenizers(config, None) if slots else {}

    autoencoder = None
    if config.autoencoder and config.load_encoders:
        vae_source = config.vae or config.pretrained
        autoencoder = diffcore.load_autoencoder(
            "sdxl" if family == "sdxl" else "sd",
            pretrained=vae_source,
            **{"dtype": config.dtype, **config.vae_options},
        )
    return SDModel(config, unet, encoders, tokenizers, autoencoder)
