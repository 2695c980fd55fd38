"""Generating images from any model that follows the Model protocol.

The one entry both ``diffcore sample`` and the training-time sampling callback use, so samples taken
during training match final inference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffcore.diffusion import objectives
from diffcore.diffusion.guidance import classifier_free_guidance
from diffcore.diffusion.samplers import BuiltinSampler, Generators, Sampler, StepCallback, noise_like
from diffcore.diffusion.samplers import lcm_scalings as lcm_scalings
from diffcore.errors import UserError
from diffcore.method import Method
from diffcore.model import DiffusionModel

#: what a method plugin needs to speak the samplers' language (consistency distillation, reflow):
#: (x0, eps) from a model output of any prediction type on x_t = alpha x0 + sigma eps, and LCM's
#: boundary-condition scalings (c_skip, c_out) at a DDPM timestep, as the ``lcm`` sampler applies them
to_x0_eps = objectives.to_x0_eps


def batch_size(batch: Mapping[str, Any]) -> int:
    """How many images a conditioning batch asks for (captions or labels)."""
    if batch.get("captions") is not None:
        return len(batch["captions"])
    if batch.get("labels") is not None:
        return len(torch.as_tensor(batch["labels"]).reshape(-1))
    raise ValueError("the batch needs 'captions' or 'labels' to tell how many images to generate")


@torch.no_grad()
def generate(
    model: DiffusionModel,
    scheduler: Any,
    *,
    batch: Mapping[str, Any],
    height: int,
    width: int,
    steps: int = 30,
    sampler: str | Sampler = "euler",
    sampler_options: Mapping[str, Any] | None = None,
    guidance: float | None = None,
    guidance_rescale: float = 0.0,
    seed: int | Sequence[int] = 0,
    eta: float = 0.0,
    karras: bool = False,
    callback: StepCallback | None = None,
    return_latents: bool = False,
    method: Method | None = None,
) -> torch.Tensor:
    """Sample one image per batch entry; returns pixels (B, C, H, W) in [-1, 1] on the model's device.

    ``guidance`` other than 1 applies classifier-free guidance against ``model.null_batch(batch)``;
    distilled-guidance models get it as ``predict(..., guidance=)`` instead (None: their default). ``seed`` fixes the start
    noise and every stochastic step, independent of device; a sequence gives one seed per image, so an
    image depends on its own seed alone, not on the batch it was drawn in (for a plugin sampler
    that draws step noise, through :func:`diffcore.diffusion.samplers.noise_like`). ``karras`` spaces DDPM-family levels per
    Karras et al. ``sampler`` is a registered sampler's name (built with ``sampler_options``, see
    :func:`build_sampler`) or a built sampler; ``eta`` is DDIM's noise (for a sampler given by name
    whose config has ``eta``). ``method``: predict through ``method.predict`` (a
    ControlNet's residuals, say) with ``batch`` carrying its ``inference_inputs``. A built-in
    sampler's ``skip_layers`` option adds skip-layer guidance to classifier-free guidance
    (models declaring ``layer_skipping``).
    """
    if isinstance(sampler, str):
        sampler = build_sampler(sampler, sampler_options, eta=eta)
    skip = sampler.skip_layer_guidance if isinstance(sampler, BuiltinSampler) else None
    if skip is not None and not model.layer_skipping:
        raise UserError(
            f"{type(model).__name__} cannot pass blocks over for skip-layer guidance",
            where="sampler option skip_layers",
            hint="remove skip_layers: the model does not declare layer_skipping",
        )
    was_training = model.backbone.training
    model.backbone.eval()
    try:
        n = batch_size(batch)
        down = int(model.latent_downscale)
        if height % down or width % down:
            raise ValueError(
                f"height and width must be multiples of {down} for this model, got {height}x{width}"
            )
        shape = (n, int(model.latent_channels), height // down, width // down)
        device = model.device
        generator: Generators
        if isinstance(seed, Sequence):
            if len(seed) != n:
                raise ValueError(f"{len(seed)} seeds for a batch of {n}")
            generator = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
        else:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        noise = noise_like(torch.empty(shape), generator).to(device)

        seq_len = None
        if scheduler.kind == "flow":
            seq_len = int(model.sequence_length(noise))
        karras = karras or sampler.karras
        schedule = scheduler.sampling_schedule(steps, sampler.schedule_as, seq_len=seq_len, karras=karras)

        cond = model.encode_conditions(batch)
        embedded = model.guidance_embedded
        use_cfg = not embedded and guidance is not None and guidance != 1.0
        null_batch = model.null_batch(batch) if use_cfg else batch
        uncond = model.encode_conditions(null_batch) if use_cfg else None
        if method is None:
            predict = functools.partial(_model_predict, model)
        else:
            predict = functools.partial(method.predict, model)
        extra = {}
        if embedded and guidance is not None:
            extra["guidance"] = torch.full((n,), float(guidance), device=device)
        prediction_type = model.prediction_type

        def denoise(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.full((n,), float(schedule.timesteps[i]), device=device, dtype=torch.float32)
            out = predict(x, t, cond, batch, **extra).float()
            if use_cfg and guidance is not None:  # use_cfg implies a guidance; this says so to the checker
                out_u = predict(x, t, uncond, null_batch, **extra).float()
                guided = classifier_free_guidance(out, out_u, guidance, guidance_rescale)
                if skip is not None and skip.active(i, schedule.steps):
                    skipped = predict(x, t, cond, batch, **extra, skip_layers=skip.layers).float()
                    guided = skip.apply(guided, out, skipped)
                out = guided
            alpha, sigma = float(schedule.alphas[i]), float(schedule.sigmas[i])
            return objectives.to_x0_eps(out, x, alpha, sigma, prediction_type)

        start = noise * schedule.init_noise_scale
        latents = sampler(denoise, start, schedule, generator=generator, callback=callback)
        if return_latents:
            return latents
        pixels = model.decode_latents(latents.to(model.dtype))
        return pixels.float().clamp(-1, 1)
    finally:
        model.backbone.train(was_training)


def _model_predict(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, cond: Any, batch: Any, **extra: Any) -> torch.Tensor:
    return model.predict(x, t, cond, **extra)


def build_sampler(
    name: str, options: Mapping[str, Any] | None = None, *, eta: float = 0.0, where: str = "sampler"
) -> Sampler:
    """The sampler registered as ``name`` (any case), its config structured from ``options``; an
    unknown name is a UserError listing the installed samplers. ``eta`` sets DDIM-style noise on a
    sampler whose config has an ``eta`` key and ``options`` does not give one."""
    import attrs

    from diffcore.config.structure import structure
    from diffcore.registry import get_registry

    registry = get_registry()
    key = name if name in registry.components["sampler"] else name.lower()
    spec = registry.get("sampler", key, where=where).spec
    options = dict(options or {})
    if eta and "eta" in attrs.fields_dict(spec.config):
        options.setdefault("eta", eta)
    return spec.factory(structure(options, spec.config, where))


def to_pil(pixels: torch.Tensor) -> list:
    """Images in [-1, 1], (B, C, H, W) with C = 1 or 3, as Pillow images."""
    from PIL import Image

    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = []
    for img in arr:
        if img.shape[0] == 1:
            out.append(Image.fromarray(img[0].numpy(), mode="L"))
        else:
            out.append(Image.fromarray(img[:3].permute(1, 2, 0).numpy(), mode="RGB"))
    return out


def save_png(
    pixels: torch.Tensor,
    directory: str | Path,
    prefix: str = "sample",
    *,
    names: Sequence[str] | None = None,
    texts: Sequence[Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write each image of a (B, C, H, W) batch in [-1, 1] as ``<prefix>-<i>.png`` (or ``<prefix>-<name>.png``
    with ``names``); ``texts`` are written into each PNG as text chunks (what made it: prompt or label,
    seed, sampler, steps, guidance). Returns the paths."""
    from PIL.PngImagePlugin import PngInfo

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(to_pil(pixels)):
        path = directory / f"{prefix}-{names[i] if names is not None else f'{i:03d}'}.png"
        info = None
        if texts is not None:
            info = PngInfo()
            for key, value in texts[i].items():
                if value is not None:
                    info.add_itxt(str(key), str(value))
        image.save(path, pnginfo=info)
        paths.append(path)
    return paths


def sample_name(index: int, seed: int, *, label: int | None = None, prompt: str | None = None, limit: int = 40) -> str:
    """A file-name stem saying what an image is: its index, label or prompt (shortened) and seed."""
    import re

    what = f"label{label}" if label is not None else ""
    if prompt is not None:
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-")
        what = f"{what}-{slug}" if what else slug
    return "-".join(part for part in (f"{index:03d}", what, f"seed{seed}") if part)


def image_grid(images: Sequence[Any] | torch.Tensor, columns: int | None = None) -> Any:
    """Tile Pillow images (or a pixel batch in [-1, 1]) into one image, row by row."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        images = to_pil(images)
    images = list(images)
    if not images:
        raise ValueError("no images to tile")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new(images[0].mode, (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
