"""The SD3 / SD3.5 model object: text conditioning and the MMDiT under the diffcore model contract."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from diffcore.errors import UserError
from diffcore.model import AdapterKey, DiffusionModel
from diffcore.weights import load_into, save_safetensors
from diffcore_sd3 import convert
from diffcore_sd3.config import SD3Config
from diffcore_sd3.network import SD3Transformer
from diffcore_sd3.text import SD3TextEncoders

#: what kohya's lora_sd3 and diffusers' SD3 LoRA recipes wrap: attention, MLP and modulation linears
ADAPTER_TARGETS = [
    r"^joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)$",
    r"^joint_blocks\.\d+\.(x_block|context_block)\.mlp\.(fc1|fc2)$",
    r"^joint_blocks\.\d+\.(x_block|context_block)\.adaLN_modulation\.1$",
]


def _targets(depth: int) -> list[str]:
    # The last block's text modulation is stored with its halves swapped in diffusers: a LoRA on it has
    # no PEFT form (its lora_B rows would have to be swapped too), so it is not a default target.
    modulation = rf"^(?!joint_blocks\.{depth - 1}\.context_block\.)" + ADAPTER_TARGETS[2].removeprefix("^")
    return [*ADAPTER_TARGETS[:2], modulation]


class SD3Model(DiffusionModel):
    """SD3 medium or SD3.5 large / large-turbo / medium under the diffcore model contract.

    ``encode_conditions(batch)`` -> ``{"context", "pooled"}``; ``predict(latents, sigma, cond,
    skip_layers=())`` -> velocity, with the listed blocks passed over (skip-layer guidance).
    """

    prediction_type = "flow"
    adapter_targets = ADAPTER_TARGETS
    autoencoder_hint = (
        "set vae to a diffusers vae/ folder or a single file holding first_stage_model.* (or pretrained to a pipeline folder)"
    )
    # SD3's reference scheduler: shift 3.0 on sd3-spaced sigmas; training draws logit-normal sigmas
    default_scheduler = {"type": "flow", "shift": 3.0}
    layer_skipping = True

    def __init__(
        self,
        backbone: SD3Transformer,
        config: SD3Config,
        *,
        text: SD3TextEncoders | None = None,
        autoencoder: Any = None,
    ):
        super().__init__(
            backbone,
            autoencoder=autoencoder,
            frozen=text.modules() if text is not None else {},
            latent_channels=backbone.shape.in_channels,
        )
        self.config = config
        self.base_model = str(config.pretrained or "")
        self.adapter_targets = _targets(backbone.shape.depth)
        self.text = text

    # -- latents ---------------------------------------------------------------------------------
    def sequence_length(self, latents: torch.Tensor) -> int:
        p = self.backbone.shape.patch_size
        return (int(latents.shape[-2]) // p) * (int(latents.shape[-1]) // p)

    # -- conditioning ----------------------------------------------------------------------------
    def encode_conditions(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.text is None:
            raise UserError(
                "this SD3 model has no text encoders loaded",
                where="$.model",
                hint="set pretrained to a diffusers SD3 folder or a single file with its text encoders, "
                "or text_encoder, text_encoder_2 (and text_encoder_3) with their tokenizers",
            )
        captions = batch["captions"]
        context, pooled = self.text.encode([captions] if isinstance(captions, str) else list(captions))
        return {"context": context, "pooled": pooled}

    def predict(
        self,
        noisy_latents: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        skip_layers: Collection[int] = (),
        **extra: Any,
    ) -> torch.Tensor:
        b = noisy_latents.shape[0]
        device = noisy_latents.device
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1).expand(b)
        return self.backbone(
            noisy_latents, t, cond["context"].to(device), cond["pooled"].to(device), skip_layers=skip_layers
        )

    # -- training knobs --------------------------------------------------------------------------
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.backbone.gradient_checkpointing = enabled

    def repeated_blocks(self) -> list[str]:
        return ["joint_blocks"]

    def flops_per_sample(self, latents: torch.Tensor) -> float | None:
        """Matmul FLOPs of one forward over the image and text tokens."""
        s = self.backbone.shape
        d, m = s.hidden_size, int(s.hidden_size * s.mlp_ratio)
        n_img = self.sequence_length(latents)
        n_txt = 77 + self.config.max_sequence_length  # the CLIP tokens, then T5's
        n = n_img + n_txt
        per_token = 2 * (4 * d * d + 2 * d * m)  # qkv, proj and MLP
        block = per_token * n + 4 * n * n * d  # + q k^T and attention @ v over the joint sequence
        dual = len(s.dual_attention_layers) * (2 * 4 * d * d * n_img + 4 * n_img * n_img * d)
        io = 2 * n_img * d * s.in_channels * s.patch_size**2 * 2 + 2 * n_txt * d * s.context_dim
        return float(s.depth * block + dual + io)

    # -- adapters and export ---------------------------------------------------------------------
    def adapter_key(self, module_path: str, layout: Literal["original", "diffusers"]) -> AdapterKey:
        """original: the Stability path (the backbone's own names); diffusers: the diffusers path, or
        for a fused ``qkv`` its three thirds; None for the modulations diffusers stores swapped."""
        if layout == "original":
            return module_path
        if module_path in convert.swapped_modules(self.backbone.shape):
            return None  # diffusers stores it with its halves swapped: no PEFT counterpart
        return convert.diffusers_modules(module_path, self.backbone.shape)

    def export_state_dict(self, layout: Literal["original", "diffusers"] = "diffusers") -> dict[str, torch.Tensor]:
        state = ((k, v.detach()) for k, v in self.backbone.state_dict().items())
        if layout == "diffusers":
            return convert.to_diffusers(state, self.backbone.shape)
        if layout == "original":
            return convert.to_original(state)
        raise UserError(f"unknown layout {layout!r}", hint="use 'diffusers' or 'original'")

    def load_exported(self, tensors: Mapping[str, torch.Tensor], where: str = "model.safetensors") -> None:
        """Fill the transformer from what :meth:`export_state_dict` wrote in the diffusers layout."""
        native = list(self.backbone.state_dict())
        stream = convert.from_diffusers(tensors.items(), native, self.backbone.shape, where=where)
        load_into(self.backbone, stream, where=where, device=self.device, dtype=self.dtype)

    def save_pretrained(self, path: str | Path, layout: Literal["original", "diffusers"] = "diffusers") -> Path:
        """Write the transformer: a diffusers ``transformer`` folder (config.json + weights), or for
        "original" the single file (``model.diffusion_model.*``; ``path`` itself when it ends in
        .safetensors)."""
        path = Path(path)
        tensors = self.export_state_dict(layout)
        if layout == "original":
            file = path if path.suffix == ".safetensors" else path / "sd3.safetensors"
            save_safetensors(tensors, file)
            return file
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path / "diffusion_pytorch_model.safetensors")
        (path / "config.json").write_text(json.dumps(convert.diffusers_config(self.backbone.shape), indent=2))
        return path
