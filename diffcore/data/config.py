"""Configs of the built-in datasets (torch-free: the registry imports this module cheaply)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from diffcore.errors import ConfigError, Problem


@attrs.define(kw_only=True)
class ImageOptions:
    """Options every image dataset shares: bucketing, transforms, bad-data policy, cache."""

    #: the pixel budget of a bucket is resolution**2; without buckets every image is resolution x resolution
    resolution: int = 512
    buckets: bool = True
    bucket_step: int = 64
    #: smallest / largest bucket side (default: resolution // 2 and resolution * 2)
    min_side: int | None = None
    max_side: int | None = None
    #: images smaller than their bucket are scaled up only when this is on (else they get a smaller bucket)
    allow_upscale: bool = False
    crop: Literal["center", "random"] = "center"
    #: probability of a horizontal flip
    flip: float = 0.0
    #: probability that a caption is replaced by "" (unconditional training for guidance)
    caption_dropout: float = 0.0
    #: shuffle comma-separated tags, keeping the first ``keep_tags`` in place
    shuffle_tags: bool = False
    keep_tags: int = 0
    #: caption of an image without one; None makes a missing caption a bad-data problem
    default_caption: str | None = None
    #: what to do with corrupt, unreadable, too small or caption-less examples
    on_bad_data: Literal["skip", "error"] = "skip"
    #: "header" opens and verifies each file at start; "decode" decodes every image (slow, thorough)
    scan: Literal["header", "decode"] = "header"
    scan_workers: int = 8
    seed: int = 0
    #: directory of the latent / text-encoder cache (see diffcore.data.cache); None = encode on the fly
    cache_dir: str | None = None


@attrs.define(kw_only=True)
class FolderConfig(ImageOptions):
    """A folder of images with same-name caption files, or one sub-folder per class."""

    path: str
    #: "auto": class sub-folders when the folder holds no images itself, else captioned images
    labels: Literal["auto", "folders", "none"] = "auto"
    caption_ext: str = ".txt"


@attrs.define(kw_only=True)
class MetadataConfig(ImageOptions):
    """Examples listed in metadata.jsonl / metadata.json (a list of objects) / metadata.csv."""

    file: str
    #: folder the paths in the file are relative to (default: the file's folder)
    root: str | None = None
    #: column names; image and caption also accept the Hugging Face names file_name and text
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"
    mask_column: str = "mask"
    control_column: str = "control"
    reference_column: str = "reference"


@attrs.define(kw_only=True)
class MixConfig:
    """Several datasets in one job: each entry is a dataset section (``type:`` and its options) plus
    ``weight`` (a multiplier on how many of its examples an epoch draws) and ``repeats`` (whole copies)."""

    datasets: list[dict[str, Any]] = attrs.field()
    seed: int = 0
    cache_dir: str | None = None

    @datasets.validator
    def _check(self, attribute: attrs.Attribute, value: list[dict[str, Any]]) -> None:
        # The entries' shape now, so `diffcore validate` reports it by path; their options are
        # structured when the mix builds them (through the build callable the kernel hands it).
        parse_mix(value)


def parse_mix(sections: list[Any], where: str = "$.data") -> list[tuple[dict[str, Any], float, int]]:
    """Each entry of a mix as (its dataset section, weight, repeats); problems carry paths."""
    if not sections:
        raise ConfigError([Problem(f"{where}.datasets", "a mix needs at least one dataset")])
    out, problems = [], []
    for i, section in enumerate(sections):
        path = f"{where}.datasets[{i}]"
        if not isinstance(section, dict) or "type" not in section:
            problems.append(Problem(path, "each entry needs a type: (folder, metadata, ...)"))
            continue
        options = dict(section)
        weight, rep = options.pop("weight", 1.0), options.pop("repeats", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            problems.append(Problem(f"{path}.weight", f"expected a number >= 0, got {weight!r}"))
        if isinstance(rep, bool) or not isinstance(rep, int) or rep < 0:
            problems.append(Problem(f"{path}.repeats", f"expected a whole number >= 0, got {rep!r}"))
        out.append((options, float(weight), rep))
    if problems:
        raise ConfigError(problems)
    return out
