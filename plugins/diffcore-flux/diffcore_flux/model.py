"""The Flux.1 model object: packing, ids, text and Kontext conditioning around the transformer."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffcore.control import ControlTrunk
from diffcore.errors import UserError
from diffcore.model import AdapterKey, DiffusionModel
from diffcore.weights import load_into, save_safetensors
from diffcore_flux import convert
from diffcore_flux.config import FluxConfig
from diffcore_flux.flops import forward_flops
from diffcore_flux.network import FluxTransformer
from diffcore_flux.packing import image_ids, pack, sequence_length, text_ids, unpack
from diffcore_flux.text import FluxTextEncoders

#: what kohya, ai-toolkit and diffusers' Flux LoRA recipes wrap: attention, MLP and modulation linears
ADAPTER_TARGETS = [
    r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$",
    r"^double_blocks\.\d+\.(img|txt)_mlp\.(0|2)$",
    r"^double_blocks\.\d+\.(img|txt)_mod\.lin$",
    r"^single_blocks\.\d+\.(linear1|linear2|modulation\.lin)$",
]


class FluxModel(DiffusionModel):
    """Flux.1 dev or schnell (optionally Kontext) under the diffcore model protocol.

    ``encode_conditions(batch)`` -> ``{"txt", "pooled"}`` plus ``"reference_latents"`` for Kontext;
    ``predict(latents BCHW, sigma, cond, guidance=None)`` -> velocity BCHW for the target image only.
    """

    prediction_type = "flow"
    adapter_targets = ADAPTER_TARGETS
    autoencoder_hint = "set vae to BFL's ae.safetensors or a diffusers vae/ folder (or pretrained to a pipeline folder)"

    def __init__(
        self,
        backbone: FluxTransformer,
        config: FluxConfig,
        *,
        text: FluxTextEncoders | None = None,
        autoencoder: Any = None,
    ):
        frozen = {"te1": text.clip, "te2": text.t5} if text is not None else {}
        super().__init__(
            backbone, autoencoder=autoencoder, frozen=frozen, latent_channels=backbone.shape.in_channels // 4
        )
        self.config = config
        self.base_model = str(config.pretrained or "")
        self.text = text
        self.kontext = config.kontext
        self.guidance_embedded = backbone.shape.guidance_embed
        if self.guidance_embedded:
            self.default_scheduler = {"type": "flow", "dynamic_shift": "flux1"}
        else:  # schnell is timestep-distilled on unshifted sigmas
            self.default_scheduler = {"type": "flow", "shift": 1.0, "sigma_spacing": "flux"}

    # -- latents ---------------------------------------------------------------------------------
    # -- conditioning ----------------------------------------------------------------------------
    def encode_conditions(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.text is None:
            raise UserError(
                "this Flux model has no text encoders loaded",
                where="$.model",
                hint="set pretrained to a diffusers Flux folder, or text_encoder, text_encoder_2, tokenizer, tokenizer_2",
            )
        captions = batch["captions"]
        txt, pooled = self.text.encode([captions] if isinstance(captions, str) else list(captions))
        cond = {"txt": txt, "pooled": pooled}
        reference = batch.get("reference")
        if self.kontext and reference is not None:
            cond["reference_latents"] = self.encode_images(reference.to(self.device))
        return cond

    def predict(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        guidance: float | torch.Tensor | None = None,
        controlnet_block_samples: Sequence[torch.Tensor] | None = None,
        controlnet_single_block_samples: Sequence[torch.Tensor] | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        b, _, h, w = noisy_latents.shape
        device, dtype = noisy_latents.device, self.dtype
        img = pack(noisy_latents.to(dtype))
        ids = image_ids(h, w, device=device)
        reference = cond.get("reference_latents")
        if reference is not None:
            # Kontext: the reference's tokens follow the target's, told apart by id axis 0 = 1.
            img = torch.cat((img, pack(reference.to(device, dtype))), dim=1)
            ids = torch.cat((ids, image_ids(*reference.shape[-2:], index=1, device=device)), dim=0)
        txt = cond["txt"].to(device, dtype)
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1).expand(b)
        g = None
        if self.guidance_embedded:
            value = self.config.guidance if guidance is None else guidance
            g = torch.as_tensor(value, device=device, dtype=torch.float32).reshape(-1).expand(b)
        out = self.backbone(
            img,
            ids,
            txt,
            text_ids(txt.shape[1], device=device),
            t,
            cond["pooled"].to(device),
            g,
            controlnet_block_samples,
            controlnet_single_block_samples,
        )
        return unpack(out[:, : (h // 2) * (w // 2)], h, w)

    @property
    def train_guidance(self) -> float:
        """The distilled-guidance value the training method passes (dev only)."""
        return self.config.guidance

    def control_trunk(self, options: Mapping[str, Any]) -> ControlTrunk:
        """A FluxControlNetModel trunk: the transformer's front with ``num_layers`` double and
        ``num_single_layers`` single blocks (diffusers' defaults 4 and 10)."""
        from diffcore_flux.control import flux_trunk

        return flux_trunk(self.backbone, options)

    def sequence_length(self, latents: torch.Tensor) -> int:
        return sequence_length(latents)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.backbone.gradient_checkpointing = enabled

    def repeated_blocks(self) -> list[str]:
        return ["double_blocks", "single_blocks"]

    def flops_per_sample(self, latents: torch.Tensor) -> float | None:
        """Matmul FLOPs of one forward over the target's tokens and the T5 text (Kontext references
        not counted), attention included, counted from the transformer's layers."""
        return float(forward_flops(self.backbone, self.sequence_length(latents), self.config.text_length))

    # -- adapters and export ---------------------------------------------------------------------
    def adapter_key(self, module_path: str, layout: str) -> AdapterKey:
        """original: the BFL path (the backbone's own names); diffusers: the diffusers path, or for a
        fused module (``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``) a list of (diffusers path, rows)."""
        if layout == "original":
            return module_path
        mapped = convert.diffusers_modules(module_path, self.backbone.shape.hidden_size)
        if mapped is None:
            return None
        targets, split = mapped
        if split in ("qkv", "linear1"):
            mlp_rows = self.backbone.single_blocks[0].mlp_hidden if split == "linear1" else None
            return [(name, rows if rows is not None else mlp_rows) for name, rows in targets]
        return targets[0][0]

    def text_encoder_key(self, name: str, layout: str) -> str:
        """te1 is CLIP-L (kohya ``te1``, diffusers ``text_encoder``); te2 is T5, which diffusers calls
        ``text_encoder_2`` but kohya's sd-scripts and ComfyUI call ``te3`` (they number encoders by
        kind, as SD3 does: te1 CLIP-L, te2 CLIP-G, te3 T5)."""
        # ComfyUI's comfy/lora.py (model_lora_keys_clip) maps a t5xxl layer to
        # "lora_te3_<HF T5 module path, dots as underscores>" and, when CLIP-L is present without
        # CLIP-G (Flux), also to lora_te2_ (OneTrainer's Flux files); CLIP-L layers to
        # "lora_te1_text_model_encoder_layers_<i>_<...>". We write te3, the name both tools read.
        if layout == "original" and name == "te2":
            return "te3"
        return super().text_encoder_key(name, layout)

    def export_state_dict(self, layout: str = "diffusers") -> dict[str, torch.Tensor]:
        state = ((k, v.detach()) for k, v in self.backbone.state_dict().items())
        if layout == "diffusers":
            return convert.to_diffusers(state, self.backbone.shape.hidden_size)
        if layout == "original":
            return convert.to_original(state)
        raise UserError(f"unknown layout {layout!r}", hint="use 'diffusers' or 'original'")

    def load_exported(self, tensors: Mapping[str, torch.Tensor], where: str = "model.safetensors") -> None:
        """Fill the transformer from what :meth:`export_state_dict` wrote in the diffusers layout."""
        native = list(self.backbone.state_dict())
        stream = convert.from_diffusers(tensors.items(), native, self.backbone.shape.hidden_size)
        load_into(self.backbone, stream, where=where, device=self.device, dtype=self.dtype)

    def save_pretrained(self, path: str | Path, layout: str = "diffusers") -> Path:
        """Write the transformer: a diffusers ``transformer`` folder (config.json + weights), or for
        "original" BFL's single file (``path`` itself when it ends in .safetensors)."""
        path = Path(path)
        tensors = self.export_state_dict(layout)
        if layout == "original":
            file = (
                path if path.suffix == ".safetensors" else path / f"flux1-{self.config.variant}.safetensors"
            )
            save_safetensors(tensors, file)
            return file
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path / "diffusion_pytorch_model.safetensors")
        (path / "config.json").write_text(json.dumps(convert.diffusers_config(self.backbone.shape), indent=2))
        return path
