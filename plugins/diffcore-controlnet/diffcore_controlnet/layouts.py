"""The ControlNet's published files: the diffusers folder (``ControlNetModel`` / ``FluxControlNetModel``:
config.json + diffusion_pytorch_model.safetensors) and, for SD1.x/2.x, the original single file
ComfyUI and A1111 load (lllyasviel's ``control_model.*`` keys)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffcore.errors import UserError
from diffcore.model import DiffusionModel
from diffcore.weights import Checkpoint, save_safetensors
from diffcore_controlnet.network import HINT, TRUNK, ZERO, ControlNet

WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
#: the families whose ControlNets circulate as original single files (SDXL and Flux ControlNets are
#: published, and loaded by ComfyUI, with the diffusers keys of the folder's file)
ORIGINAL_FAMILIES = ("sd15", "sd21")
ORIGINAL_PREFIX = "control_model."


def save_folder(net: ControlNet, state: Mapping[str, torch.Tensor], folder: Path, metadata: Mapping[str, str]) -> Path:
    """Write the diffusers folder that ``ControlNetModel.from_pretrained`` (or the Flux class) loads."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in net.diffusers_state(state).items()}
    save_safetensors(tensors, folder / WEIGHTS, dict(metadata))
    (folder / CONFIG).write_text(json.dumps(net.diffusers_config(), indent=2))
    return folder


def read_folder(folder: str | Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, tensors) of a diffusers ControlNet folder."""
    path = Path(folder)
    if not (path / CONFIG).is_file():
        raise UserError(
            f"{path} is not a diffusers ControlNet folder (no {CONFIG})",
            where=where,
            hint="give the folder holding config.json and diffusion_pytorch_model.safetensors",
        )
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / CONFIG} is not JSON: {exc}", where=where) from None
    name = config.get("_class_name", "")
    if name not in ("ControlNetModel", "FluxControlNetModel"):
        raise UserError(
            f"{path} holds a {name or 'model without _class_name'}, not a ControlNet this plugin loads",
            where=where,
            hint="ControlNetModel (SD1.x/2.x, SDXL) or FluxControlNetModel folders",
        )
    for key in ("num_mode", "conditioning_embedding_channels"):
        if config.get(key) is not None:
            raise UserError(f"{key}={config[key]!r} (union or pixel-hint Flux ControlNets) is not supported", where=where)
    return config, dict(Checkpoint(path).items())


def save_original(
    net: ControlNet,
    state: Mapping[str, torch.Tensor],
    model: DiffusionModel,
    file: Path,
    metadata: Mapping[str, str],
) -> Path:
    """The original single file: the trunk under the UNet's original names (the model's
    ``adapter_key(path, "original")``), ``input_hint_block`` (convs at 0, 2, 4, ...), ``zero_convs.i.0``
    and ``middle_block_out.0``."""
    out: dict[str, torch.Tensor] = {}
    n = len(net.zero)
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if key.startswith(TRUNK):
            original = model.adapter_key(module[len(TRUNK) :], "original")
            if not isinstance(original, str):
                raise UserError(f"{module} has no original name", where=str(file))
            name = f"{original}.{param}"
        elif key.startswith(HINT):
            # one Sequential of convs with a SiLU after each but the last
            part = module[len(HINT) :]
            if part == "conv_in":
                index = 0
            elif part == "conv_out":
                index = 2 + 2 * len(net.hint.blocks)
            else:
                index = 2 + 2 * int(part.split(".")[1])
            name = f"input_hint_block.{index}.{param}"
        else:
            i = int(module[len(ZERO) :])
            name = f"zero_convs.{i}.0.{param}" if i < n - 1 else f"middle_block_out.0.{param}"
        out[ORIGINAL_PREFIX + name] = value.contiguous()
    save_safetensors(out, file, dict(metadata))
    return file
