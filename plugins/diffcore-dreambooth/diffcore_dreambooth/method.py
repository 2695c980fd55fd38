"""The ``dreambooth`` method: the default objective on the instance batch plus, weighted, on as many
class examples (prior preservation)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcore import Problem, UserError
from diffcore.context import TrainContext
from diffcore.method import Logs
from diffcore.methods.diffusion import DiffusionMethod
from diffcore.model import DiffusionModel
from diffcore_dreambooth import class_images
from diffcore_dreambooth.config import DreamBoothConfig

WHERE = "$.method"


class DreamBoothMethod(DiffusionMethod):
    def __init__(self, config: DreamBoothConfig):
        super().__init__(config)
        self.config: DreamBoothConfig = config
        self.class_paths: list[Path] = []
        self.class_size: tuple[int, int] = (0, 0)
        # class images never change during a run: each is encoded once, on first use
        self._latents: dict[int, torch.Tensor] = {}

    @property
    def prior(self) -> bool:
        return self.config.prior_loss_weight > 0

    def class_dir(self, output_dir: str | Path) -> Path:
        if self.config.class_dir is not None:
            return Path(self.config.class_dir).expanduser()
        return Path(output_dir) / "class_images"

    # -- checks ----------------------------------------------------------------------------------
    def validate(self, job: Any) -> list[Problem]:
        c, problems = self.config, []
        if c.prior_loss_weight < 0:
            problems.append(Problem(f"{WHERE}.prior_loss_weight", f"must be >= 0, got {c.prior_loss_weight}"))
        counts = {"num_class_images": c.num_class_images, "sample_steps": c.sample_steps, "generation_batch": c.generation_batch}
        for key, value in counts.items():
            if value < 1:
                problems.append(Problem(f"{WHERE}.{key}", f"must be at least 1, got {value}"))
        if c.class_resolution is not None and c.class_resolution < 8:
            problems.append(Problem(f"{WHERE}.class_resolution", f"must be at least 8, got {c.class_resolution}"))
        if c.train_text_encoder and getattr(job.data.config, "cache_dir", None):
            problems.append(
                Problem(
                    "$.data.cache_dir",
                    "train_text_encoder trains what the text encoders compute, which a cache would freeze; "
                    "remove cache_dir or set train_text_encoder: false",
                )
            )
        if not self.prior:
            return problems
        if c.class_prompt is None and c.class_label is None:
            problems.append(
                Problem(
                    f"{WHERE}.class_prompt",
                    "prior preservation needs what the class images show: set class_prompt (captioned "
                    "models) or class_label (class-conditional models such as DiT), or prior_loss_weight: 0",
                )
            )
        if not c.generate:
            if c.class_dir is None:
                problems.append(
                    Problem(f"{WHERE}.class_dir", "generate is false, so the class images must come from a folder: set class_dir")
                )
            else:
                folder = self.class_dir(job.output_dir)
                have = len(class_images.list_images(folder))
                if have < c.num_class_images:
                    problems.append(
                        Problem(
                            f"{WHERE}.class_dir",
                            f"{folder} holds {have} class images but num_class_images asks for "
                            f"{c.num_class_images} and generate is false; add images, lower "
                            "num_class_images, or set generate: true",
                        )
                    )
        return problems

    # -- set-up ----------------------------------------------------------------------------------
    def modules(self, model: DiffusionModel) -> dict[str, nn.Module]:
        """With ``train_text_encoder``, the model's text encoders under their diffusers names: the
        kernel trains, checkpoints and exports them (``text_encoder.safetensors``, ...)."""
        if not self.config.train_text_encoder:
            return {}
        if not model.frozen:
            raise UserError(
                f"{model.architecture or type(model).__name__} has no text encoders to train",
                where=f"{WHERE}.train_text_encoder",
                hint="set it to false for this model",
            )
        encoders = {model.text_encoder_key(name, "diffusers"): module for name, module in model.frozen.items()}
        for module in encoders.values():
            module.requires_grad_(True)
        return encoders

    def setup(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        if ctx.adapter_params is not None:
            params = list(ctx.adapter_params)
        else:  # full finetune, whether or not the text encoders train too
            ctx.model.backbone.requires_grad_(True)
            params = [p for p in ctx.model.backbone.parameters() if p.requires_grad]
        if self.prior:
            self.class_paths = self.prepare_class_images(ctx)
        return params

    def instance_size(self, ctx: TrainContext) -> tuple[int, int]:
        if self.config.class_resolution is not None:
            return self.config.class_resolution, self.config.class_resolution
        example = ctx.dataset[0]
        if "pixels" in example:
            h, w = example["pixels"].shape[-2:]
            return int(h), int(w)
        h, w = example["latents"].shape[-2:]
        down = int(ctx.model.latent_downscale)
        return int(h) * down, int(w) * down

    def prepare_class_images(self, ctx: TrainContext) -> list[Path]:
        """The class images of the prior, generating the missing ones (every rank takes part)."""
        c = self.config
        folder = self.class_dir(ctx.output_dir)
        height, width = self.class_size = self.instance_size(ctx)
        settings = class_images.Generation(
            prompt=c.class_prompt,
            label=c.class_label,
            height=height,
            width=width,
            sampler=c.sampler,
            steps=c.sample_steps,
            guidance=c.guidance,
            batch=c.generation_batch,
            seed=int(ctx.job.seed),
            architecture=ctx.model.architecture,
            base_model=ctx.model.base_model,
        )
        given = class_images.list_images(folder)
        if not c.generate or (len(given) >= c.num_class_images and class_images.read_manifest(folder) is None):
            # the folder as it is (validate checked the count; a folder may change in between)
            if len(given) < c.num_class_images:
                raise UserError(
                    f"{folder} holds {len(given)} class images but {c.num_class_images} are asked and generate is false",
                    where=f"{WHERE}.class_dir",
                    hint="add images, lower num_class_images, or set generate: true",
                )
            return given[: c.num_class_images]
        given, planned = class_images.plan(folder, c.num_class_images, settings)
        if any(not (folder / e["file"]).is_file() for e in planned):
            if ctx.is_main:
                class_images.write_manifest(folder, settings, planned)
            _barrier()

            def say(text: str) -> None:
                if ctx.is_main:
                    print(f"diffcore-dreambooth: {text}", flush=True)

            class_images.generate_missing(
                folder,
                settings,
                planned,
                lambda s, n, seed: make_class_batch(ctx, s, n, seed),
                rank=ctx.rank,
                world_size=ctx.world_size,
                progress=say,
            )
            _barrier()
        return [*given, *(folder / e["file"] for e in planned)][: c.num_class_images]

    # -- the loss --------------------------------------------------------------------------------
    def loss(self, ctx: TrainContext, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        instance = self.denoising_loss(ctx, batch)
        if not self.prior:
            return instance, {}
        rand = ctx.step_random
        assert rand is not None, "the loop sets ctx.step_random before every micro-step"
        b = len(batch["latents"] if "latents" in batch else batch["pixels"])
        count = len(self.class_paths)
        # drawn after the instance part's draws, so prior_loss_weight 0 and the default method agree
        picks = rand.call(lambda n, g: torch.randint(count, (n,), generator=g), b)
        prior = self.denoising_loss(ctx, self.class_batch(ctx, picks.tolist()))
        total = instance + self.config.prior_loss_weight * prior
        return total, {"instance_loss": instance.detach(), "prior_loss": prior.detach()}

    def class_batch(self, ctx: TrainContext, picks: list[int]) -> dict[str, Any]:
        """Class examples ``picks`` as a micro-batch: latents and the class prompt and/or label."""
        height, width = self.class_size
        for i in picks:
            if i not in self._latents:
                pixels = class_images.load_image(self.class_paths[i], height, width)
                self._latents[i] = ctx.model.encode_images(pixels[None].to(ctx.device, ctx.model.dtype))[0].float()
        out: dict[str, Any] = {"latents": torch.stack([self._latents[i] for i in picks])}
        if self.config.class_prompt is not None:
            out["captions"] = [self.config.class_prompt] * len(picks)
        if self.config.class_label is not None:
            out["labels"] = torch.full((len(picks),), self.config.class_label, dtype=torch.long)
        return out


def make_class_batch(ctx: TrainContext, settings: class_images.Generation, n: int, seed: int) -> torch.Tensor:
    """``n`` class images from the base model with the kernel's sampler (what ``diffcore sample`` does)."""
    from diffcore.sampling import generate

    batch: dict[str, Any] = {}
    if settings.prompt is not None:
        batch["captions"] = [settings.prompt] * n
    if settings.label is not None:
        batch["labels"] = torch.full((n,), settings.label, dtype=torch.long, device=ctx.device)
    return generate(
        ctx.model,
        ctx.scheduler,
        batch=batch,
        height=settings.height,
        width=settings.width,
        steps=settings.steps,
        sampler=settings.sampler,
        guidance=settings.guidance,
        seed=seed,
    ).cpu()


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
