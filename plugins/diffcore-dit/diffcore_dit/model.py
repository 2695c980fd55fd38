"""The DiT as diffcore's model protocol: conditioning, prediction, export and saving."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.errors import UserError
from diffcore.model import AdapterKey, DiffusionModel
from diffcore.weights import load_into, save_safetensors
from diffcore_dit.config import DiTArch
from diffcore_dit.convert import (
    diffusers_module_name,
    diffusers_module_names,
    from_diffusers,
    original_key,
    to_diffusers,
    to_original,
)
from diffcore_dit.flops import forward_flops
from diffcore_dit.network import DiT

#: safetensors metadata key holding the architecture of an original-layout file diffcore wrote
ARCH_METADATA = "diffcore.dit.arch"


class DiTModel(DiffusionModel):
    """A class-conditional DiT; ``null_label`` (= num_classes) is the unconditional class."""

    adapter_targets = [r"blocks\.\d+\.attn\.(qkv|proj)$", r"blocks\.\d+\.mlp\.fc[12]$"]

    def __init__(self, backbone: DiT, *, prediction_type: str = "eps", autoencoder: Any = None):
        super().__init__(backbone, autoencoder=autoencoder, latent_channels=backbone.arch.in_channels)
        self.prediction_type = prediction_type
        self.null_label = backbone.arch.num_classes

    @property
    def arch(self) -> DiTArch:
        return self.backbone.arch

    @property
    def default_scheduler(self) -> dict[str, Any]:
        if self.prediction_type == "flow":
            return {"type": "flow"}
        # the schedule DiT was trained with
        return {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}

    def encode_conditions(self, batch: Mapping[str, Any]) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            raise UserError(
                "the DiT is class-conditional but the batch has no labels",
                where="$.data",
                hint="use a dataset that yields labels (e.g. type: synthetic)",
            )
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        # checked where the batch arrives (the host): on the device the check would wait for it every step
        checked = labels if labels.device.type == "cpu" else labels.new_empty(0)
        if checked.numel() and (int(checked.min()) < 0 or int(checked.max()) > self.null_label):
            raise UserError(
                f"class labels must lie in [0, {self.null_label}] ({self.null_label} = no class), "
                f"got {int(labels.min())}..{int(labels.max())}",
                where="$.model.num_classes",
                hint="set num_classes to the dataset's number of classes",
            )
        return labels.to(self.device)

    def predict(
        self, noisy_latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **extra: Any
    ) -> torch.Tensor:
        x = noisy_latents.to(self.dtype)
        t = torch.as_tensor(t, device=x.device).float()
        if self.prediction_type == "flow":
            t = t * 1000  # sigma in [0, 1] onto the [0, 1000) range the timestep sinusoid is built for
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.backbone(x, t, cond)
        # the learned-variance half is not a prediction of prediction_type
        return out[:, : self.arch.in_channels] if self.arch.learn_sigma else out

    # -- weights ---------------------------------------------------------------------------------
    def export_state_dict(self, layout: str = "diffusers") -> dict[str, torch.Tensor]:
        """The backbone's weights in the ``"diffusers"`` or ``"original"`` (facebookresearch/DiT) layout."""
        state = {k: v.detach() for k, v in self.backbone.state_dict().items()}
        if layout == "diffusers":
            return to_diffusers(state, self.arch.depth)
        if layout == "original":
            grid = self.backbone.grid
            return to_original(state, self.backbone.positions(grid, grid, self.backbone.pos_embed).float())
        raise UserError(f"unknown checkpoint layout {layout!r}", hint='use "diffusers" or "original"')

    def load_exported(self, tensors: Mapping[str, torch.Tensor], where: str = "model.safetensors") -> None:
        """Fill the backbone from what :meth:`export_state_dict` wrote in the diffusers layout."""
        stream = from_diffusers(tensors.items(), self.backbone.state_dict(), self.arch.depth, where=where)
        load_into(self.backbone, stream, where=where, device=self.device, dtype=self.dtype)
        self.backbone.init_buffers()

    def diffusers_config(self) -> dict[str, Any]:
        a = self.arch
        return {
            "_class_name": "DiTTransformer2DModel",
            "num_attention_heads": a.num_heads,
            "attention_head_dim": a.hidden_size // a.num_heads,
            "in_channels": a.in_channels,
            "out_channels": a.out_channels,
            "num_layers": a.depth,
            "dropout": 0.0,
            "norm_num_groups": 32,
            "attention_bias": True,
            "sample_size": a.input_size,
            "patch_size": a.patch_size,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": a.num_classes,
            "upcast_attention": False,
            "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False,
            "norm_eps": a.norm_eps,
        }

    def save_pretrained(self, path: str | Path, layout: str = "diffusers") -> Path:
        """Write the backbone as a diffusers folder (config.json + diffusion_pytorch_model.safetensors)
        or, with ``layout="original"``, one original-layout .safetensors file (``path`` itself when it
        ends in .safetensors, else ``path/model.safetensors``). Returns what was written."""
        path = Path(path)
        tensors = self.export_state_dict(layout)
        if layout == "diffusers":
            path.mkdir(parents=True, exist_ok=True)
            save_safetensors(tensors, path / "diffusion_pytorch_model.safetensors", {"format": "pt"})
            (path / "config.json").write_text(json.dumps(self.diffusers_config(), indent=2) + "\n")
            return path
        file = path if path.suffix == ".safetensors" else path / "model.safetensors"
        arch = json.dumps(attrs.asdict(self.arch))
        save_safetensors(tensors, file, {"format": "pt", ARCH_METADATA: arch})
        return file

    def adapter_key(self, module_path: str, layout: str) -> AdapterKey:
        """original: facebookresearch/DiT's name; diffusers: DiTTransformer2DModel's, or for the fused
        ``attn.qkv`` its three parts ``attn1.to_q/k/v`` of ``hidden_size`` rows each (PEFT files)."""
        if layout == "original":
            return original_key(module_path)
        name = diffusers_module_name(module_path)
        if name is not None or not module_path.endswith(".attn.qkv"):
            return name
        parts = diffusers_module_names(module_path)
        return [(part, self.arch.hidden_size) for part in parts] if parts else None

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.backbone.gradient_checkpointing = enabled

    def repeated_blocks(self) -> list[str]:
        return ["blocks"]

    def sequence_length(self, latents: torch.Tensor) -> int:
        """Tokens after patchifying: one per ``patch_size`` x ``patch_size`` latent square."""
        p = self.arch.patch_size
        return (int(latents.shape[-2]) // p) * (int(latents.shape[-1]) // p)

    def flops_per_sample(self, latents: torch.Tensor) -> float | None:
        """Matmul FLOPs of one forward (attention included), counted from the backbone's layers."""
        return float(forward_flops(self.backbone, int(latents.shape[-2]), int(latents.shape[-1])))
