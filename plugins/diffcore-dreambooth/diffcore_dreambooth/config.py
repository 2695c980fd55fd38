"""The ``method: {type: dreambooth}`` section (torch-free: plugin discovery imports it)."""

from __future__ import annotations

import attrs

from diffcore.methods.config import DiffusionMethodConfig

#: image files a class folder may hold
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@attrs.define(kw_only=True)
class DreamBoothConfig(DiffusionMethodConfig):
    """The job's data are the instance images; class images keep the prior (prior preservation).

    The loss of a micro-batch is ``instance + prior_loss_weight * prior``, each the default
    method's loss, the prior part on as many class examples as the batch has instance examples.
    """

    #: 0 turns prior preservation off (then no class images are needed)
    prior_loss_weight: float = 1.0
    #: caption of every class image (caption-conditioned models: UNet family, Flux)
    class_prompt: str | None = None
    #: class index of every class image (class-conditional models: DiT)
    class_label: int | None = None
    #: folder of class images; generated ones are written there too (default: <output_dir>/class_images)
    class_dir: str | None = None
    #: how many class images the prior uses
    num_class_images: int = 100
    #: generate the class images the folder lacks with the base model before training
    generate: bool = True
    #: side of the class images (default: the size of the first instance example)
    class_resolution: int | None = None
    #: generation settings (recorded in the folder's manifest.json with each image's seed)
    sampler: str = "euler"
    sample_steps: int = 30
    #: classifier-free guidance scale (distilled-guidance models take it as their guidance input)
    guidance: float = 5.0
    #: images per generation call
    generation_batch: int = 4
    #: also train the model's text encoders (their whole weights; adapters may train them too)
    train_text_encoder: bool = False
