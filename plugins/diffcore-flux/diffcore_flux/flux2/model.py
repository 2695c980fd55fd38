"""The Flux.2 model object: flattening, ids, text, Kontext references and Fill around the transformer."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from diffcore.errors import UserError
from diffcore.flops import linear_flops
from diffcore.model import AdapterKey, DiffusionModel
from diffcore.weights import load_into, save_safetensors
from diffcore_flux.flux2 import convert, edit
from diffcore_flux.flux2.config import Flux2Config
from diffcore_flux.flux2.network import Flux2Transformer
from diffcore_flux.flux2.text import Flux2Text

#: attention and MLP linears (what diffusers' kohya Flux.2 converter maps; the shared modulation is left out)
ADAPTER_TARGETS = [
    r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$",
    r"^double_blocks\.\d+\.(img|txt)_mlp\.(0|2)$",
    r"^single_blocks\.\d+\.(linear1|linear2)$",
]
#: pixels per latent position along a side of the released models (8x VAE, 2x2 patch): the
#: channel-concatenation Fill form folds a mask's 16 x 16 cell into 256 input channels
MASK_FACTOR = 16

FillForm = Literal["reference", "concat"]


class Flux2Model(DiffusionModel):
    """Flux.2 dev or klein under the diffcore model protocol.

    ``encode_conditions(batch)`` -> ``{"txt"}`` plus ``"reference_latents"`` (a list) for references
    and the Fill inputs when the batch has a ``mask``; ``predict(latents BCHW, sigma, cond,
    guidance=None)`` -> the velocity of the target image (B, C, H, W).
    """

    prediction_type = "flow"
    adapter_targets = ADAPTER_TARGETS
    autoencoder_hint = "set vae to the Flux.2 ae.safetensors or a diffusers vae/ folder (or pretrained to a pipeline folder)"
    default_scheduler = {"type": "flow", "dynamic_shift": "flux2"}

    def __init__(
        self,
        backbone: Flux2Transformer,
        config: Flux2Config,
        *,
        text: Flux2Text | None = None,
        autoencoder: Any = None,
    ):
        frozen = {"te1": text.model} if text is not None else {}
        shape = backbone.shape
        super().__init__(backbone, autoencoder=autoencoder, frozen=frozen, latent_channels=shape.out_channels)
        self.config = config
        self.base_model = str(config.pretrained or "")
        self.text = text
        self.guidance_embedded = shape.guidance_embed
        self.fill_form: FillForm = self._fill_form()

    def _fill_form(self) -> FillForm:
        shape = self.backbone.shape
        c = shape.out_channels
        if self.autoencoder is not None and self.autoencoder.latent_channels != c:
            raise UserError(
                f"the autoencoder gives {self.autoencoder.latent_channels} latent channels but the "
                f"transformer predicts {c}",
                where="$.model.vae",
                hint="use the Flux.2 autoencoder (32 channels, patchified to 128)",
            )
        if shape.in_channels == c:
            return "reference"
        if shape.in_channels == 2 * c + self.mask_factor**2:
            return "concat"
        raise UserError(
            f"a transformer taking {shape.in_channels} input channels for {c} latent channels is neither "
            f"plain ({c}) nor a channel-concatenation Fill model ({2 * c + self.mask_factor**2})",
            where="$.model.pretrained",
        )

    @property
    def mask_factor(self) -> int:
        """Pixels per latent position along a side: what a mask cell folds into channels."""
        return int(self.autoencoder.downscale) if self.autoencoder is not None else MASK_FACTOR

    @property
    def train_guidance(self) -> float:
        """The distilled-guidance value dev trains with (1.0 unless set)."""
        return self.config.guidance

    # -- latents ---------------------------------------------------------------------------------
    def _require_autoencoder(self) -> None:
        if self.autoencoder is None and not self.config.load_encoders:
            raise UserError(
                "the autoencoder was not loaded because the latent cache is complete, but reference "
                "images, masks and samples need it",
                where="$.data.cache_dir",
                hint="train edit jobs without a cache_dir",
            )
        super()._require_autoencoder()

    # -- conditioning ----------------------------------------------------------------------------
    def encode_conditions(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.text is None:
            raise UserError(
                "this Flux.2 model has no text encoder loaded",
                where="$.model",
                hint="set pretrained to a diffusers Flux.2 folder, or text_encoder and tokenizer",
            )
        captions = batch["captions"]
        txt = self.text.encode([captions] if isinstance(captions, str) else list(captions))
        return self.complete_conditions({"txt": txt}, batch)

    def complete_conditions(self, cond: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Text conditioning (encoded, or read from the cache) plus the batch's references and mask."""
        cond = dict(cond)
        references = _images(batch.get("reference"))
        mask = batch.get("mask")
        if mask is None:
            if self.fill_form == "concat":
                raise UserError(
                    "this is a channel-concatenation Fill checkpoint: every example needs a mask",
                    where="mask",
                    hint="give the dataset a mask column (or diffcore sample --mask IMG)",
                )
            if references:
                cond["reference_latents"] = [self.encode_images(r.to(self.device)) for r in references]
            return cond
        return self._fill_conditions(cond, batch, references, mask.to(self.device))

    def _fill_conditions(
        self, cond: dict[str, Any], batch: Mapping[str, Any], references: list[torch.Tensor], mask: torch.Tensor
    ) -> dict[str, Any]:
        if references:
            source, others = references[0].to(self.device), references[1:]
        elif "pixels" in batch:
            # training without a source image: the target with its masked area blanked, so the
            # model cannot copy the answer from the reference
            pixels = batch["pixels"].to(self.device)
            source, others = pixels * (1 - (mask >= 0.5).to(pixels.dtype)), []
        else:
            raise UserError(
                "Fill needs the image to edit: give it as the first reference",
                where="reference",
                hint="diffcore sample --reference SOURCE.png --mask MASK.png",
            )
        if mask.shape[-2:] != source.shape[-2:]:
            raise UserError(
                f"the mask is {tuple(mask.shape[-2:])} pixels but its image is {tuple(source.shape[-2:])}",
                where="mask",
                hint="give a mask of the same size as the image",
            )
        if self.fill_form == "concat":
            if others:
                raise UserError(
                    "a channel-concatenation Fill model takes no further reference images",
                    where="reference",
                    hint="give only the image to edit",
                )
            masked = source * (1 - mask.to(source.dtype))
            latents = self.encode_images(masked)
            folded = edit.fold_mask(mask, self.mask_factor).to(latents.dtype)
            cond["concat"] = torch.cat((latents, folded), dim=1)
            return cond
        source_latents = self.encode_images(source)
        cond["reference_latents"] = [source_latents] + [self.encode_images(r.to(self.device)) for r in others]
        cond["fill_source"] = source_latents
        cond["fill_mask"] = edit.latent_mask(mask, *source_latents.shape[-2:])
        return cond

    def predict(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, Any],
        guidance: float | torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        b, _, h, w = noisy_latents.shape
        device, dtype = noisy_latents.device, self.dtype
        img = edit.flatten(noisy_latents.to(dtype))
        concat = cond.get("concat")
        if concat is not None:
            img = torch.cat((img, edit.flatten(concat.to(device, dtype))), dim=-1)
        ids = edit.grid_ids(h, w, device=device)
        references = cond.get("reference_latents") or []
        if references:
            img = torch.cat([img, *(edit.flatten(r.to(device, dtype)) for r in references)], dim=1)
            ids = torch.cat((ids, edit.reference_ids([r.shape[-2:] for r in references], device=device)), dim=0)
        txt = cond["txt"].to(device, dtype)
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1).expand(b)
        g = None
        if self.guidance_embedded:
            value = self.config.guidance if guidance is None else guidance
            g = torch.as_tensor(value, device=device, dtype=torch.float32).reshape(-1).expand(b)
        out = self.backbone(img, ids, txt, edit.text_ids(txt.shape[1], device=device), t, g, keep=h * w)
        velocity = edit.unflatten(out, h, w)
        if "fill_mask" in cond:
            velocity = edit.fill_velocity(velocity, noisy_latents, t, cond["fill_source"], cond["fill_mask"])
        return velocity

    # -- training knobs --------------------------------------------------------------------------
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.backbone.gradient_checkpointing = enabled

    def repeated_blocks(self) -> list[str]:
        return ["double_blocks", "single_blocks"]

    def flops_per_sample(self, latents: torch.Tensor) -> float | None:
        """Matmul FLOPs of one forward over the target tokens and the text (references not counted)."""
        s = self.backbone.shape
        d, m = s.hidden_size, s.mlp_hidden
        n_img, n_txt = int(latents.shape[-2]) * int(latents.shape[-1]), self.config.max_sequence_length
        n = n_img + n_txt
        attention = 4 * n * n * d
        double = 2 * n * (4 * d * d + 3 * m * d) + attention
        single = 2 * n * (d * (3 * d + 2 * m) + (d + m) * d) + attention
        # the last block's queries and linear2 run over the image tokens only
        last = n_txt * (4 * n * d + 2 * (d + m) * d) if s.depth_single else 0
        io = 2 * d * (n_img * (s.in_channels + s.out_channels) + n_txt * s.context_in_dim)  # each stream its own
        net = self.backbone
        once = linear_flops(  # the time embedding and the shared modulations, once per sample
            net.time_in, net.guidance_in, net.double_stream_modulation_img, net.double_stream_modulation_txt,
            net.single_stream_modulation, net.final_layer.adaLN_modulation,
        )  # fmt: skip
        return float(s.depth * double + s.depth_single * single - last + io + once)

    # -- adapters and export ---------------------------------------------------------------------
    def adapter_key(self, module_path: str, layout: Literal["original", "diffusers"]) -> AdapterKey:
        """original: the BFL path (the backbone's own names); diffusers: the diffusers path, or for a
        double block's fused qkv its three thirds."""
        if layout == "original":
            return module_path
        mapped = convert.diffusers_modules(module_path)
        if mapped is None:
            return None
        names, thirds = mapped
        if thirds:
            dim = self.backbone.shape.hidden_size
            return [(name, dim) for name in names]
        return names[0]

    def export_state_dict(self, layout: Literal["original", "diffusers"] = "diffusers") -> dict[str, torch.Tensor]:
        state = ((k, v.detach()) for k, v in self.backbone.state_dict().items())
        if layout == "diffusers":
            return convert.to_diffusers(state)
        if layout == "original":
            return convert.to_original(state)
        raise UserError(f"unknown layout {layout!r}", hint="use 'diffusers' or 'original'")

    def load_exported(self, tensors: Mapping[str, torch.Tensor], where: str = "model.safetensors") -> None:
        native = list(self.backbone.state_dict())
        stream = convert.from_diffusers(tensors.items(), native, where=where)
        load_into(self.backbone, stream, where=where, device=self.device, dtype=self.dtype)

    def save_pretrained(self, path: str | Path, layout: Literal["original", "diffusers"] = "diffusers") -> Path:
        """Write the transformer: a diffusers ``transformer`` folder, or for "original" BFL's single
        file (``path`` itself when it ends in .safetensors)."""
        path = Path(path)
        tensors = self.export_state_dict(layout)
        if layout == "original":
            file = path if path.suffix == ".safetensors" else path / f"flux2-{self.config.variant}.safetensors"
            save_safetensors(tensors, file)
            return file
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path / "diffusion_pytorch_model.safetensors")
        (path / "config.json").write_text(json.dumps(convert.diffusers_config(self.backbone.shape), indent=2))
        return path


def _images(value: Any) -> list[torch.Tensor]:
    """The batch's references as a list of (B, C, H, W) tensors (one tensor, or a list of them)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    return list(value)
