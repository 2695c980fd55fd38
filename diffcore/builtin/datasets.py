"""Built-in datasets (records only; no torch at import)."""

from __future__ import annotations


def records() -> list:
    from diffcore.data.config import FolderConfig, MetadataConfig, MixConfig
    from diffcore.data.factories import build_folder, build_metadata, build_mix
    from diffcore.data.synthetic_config import SyntheticConfig
    from diffcore.records import DatasetSpec

    return [
        DatasetSpec(
            name="folder",
            config=FolderConfig,
            factory=build_folder,
            description="images with same-name .txt captions, or one sub-folder per class",
        ),
        DatasetSpec(
            name="metadata",
            config=MetadataConfig,
            factory=build_metadata,
            description="images listed in metadata.jsonl / .json / .csv (caption, label, mask, control, reference)",
        ),
        DatasetSpec(
            name="mix",
            config=MixConfig,
            factory=build_mix,
            description="several dataset sections mixed with weights and repeats",
        ),
        DatasetSpec(
            name="synthetic",
            config=SyntheticConfig,
            factory=_build_synthetic,
            description="labelled coloured shapes drawn on the fly (no download; the quickstart's data)",
        ),
    ]


def _build_synthetic(config, build=None, where: str = "$.data"):
    from diffcore.data.synthetic import build_synthetic

    return build_synthetic(config, where)
