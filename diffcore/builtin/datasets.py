"""Built-in datasets (records only; no torch at import)."""

from __future__ import annotations


def records() -> list:
    from diffcore.data.config import FolderConfig, MetadataConfig, MixConfig
    from diffcore.data.factories import build_folder, build_metadata, build_mix
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
    ]
