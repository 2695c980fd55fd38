"""Whether a weights file or folder is an SD 1.x, 2.x or SDXL model, and in which layout
(torch-free: ``ModelSpec.detect``).

All three share the UNet layout; SDXL alone has the added (size/crop) embedding. SD 2.x projects
into its transformers with Linear layers where SD 1.x uses 1x1 convolutions, which tells the two
apart whether or not the file carries its text encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from diffcore.layouts import LayoutProbe

_UNET = "model.diffusion_model."


def _family(shapes: Mapping[str, tuple[int, ...]], added: str, proj_in: str) -> str | None:
    if added in shapes:
        return "sdxl"
    projection = shapes.get(proj_in)
    if projection is None:
        return None
    return "sd21" if len(projection) == 2 else "sd15"


def family(probe: LayoutProbe) -> tuple[str, str] | None:
    """(family, layout) of an SD-family file or folder, or None."""
    shapes = probe.shapes
    if _UNET + "input_blocks.0.0.weight" in shapes:
        found = _family(
            shapes, _UNET + "label_emb.0.0.weight", _UNET + "input_blocks.1.1.proj_in.weight"
        )
        if found is None:  # no attention in the first level (SDXL-shaped without the embedding)
            found = _family(shapes, _UNET + "label_emb.0.0.weight", _UNET + "input_blocks.4.1.proj_in.weight")
        return (found, "original") if found else None
    if probe.is_file:
        # a UNet alone under diffusers names (a run's model.safetensors) is no pipeline this plugin loads
        return None
    unet = probe.component("unet")
    if "conv_in.weight" in unet and "down_blocks.0.resnets.0.conv1.weight" in unet:
        attention = next(
            (k for k in sorted(unet) if k.startswith("down_blocks.") and k.endswith("attentions.0.proj_in.weight")),
            "",
        )
        found = _family(unet, "add_embedding.linear_1.weight", attention)
        return (found, "diffusers") if found else None
    return None


def detector(name: str) -> Callable[[LayoutProbe], str | None]:
    """The ``detect`` of model ``name`` ("sdxl", "sd15", "sd21")."""

    def detect(probe: LayoutProbe) -> str | None:
        found = family(probe)
        return found[1] if found is not None and found[0] == name else None

    detect.__name__ = f"detect_{name}"
    return detect
