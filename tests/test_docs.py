"""The README documents what users reach for: every key of every built-in dataset, and the class
folder layout the example uses."""

import re
from pathlib import Path

import attrs
from PIL import Image

import diffcore
from diffcore.config.job import load_job
from diffcore.data.config import FolderConfig, ImageOptions, MetadataConfig, MixConfig
from diffcore.data.synthetic_config import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]


def _datasets_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Built-in datasets")
    return text[start : text.index("\n## ", start)]


def test_every_builtin_dataset_key_is_in_the_readme_table():
    section = _datasets_section()
    for name, config in [("synthetic", SyntheticConfig), ("folder", FolderConfig), ("metadata", MetadataConfig),
                         ("mix", MixConfig)]:
        assert re.search(rf"^\| `{name}` \|", section, re.M), name
        for field in attrs.fields(config):
            assert f"`{field.name}`" in section, f"{name}.{field.name}"
    for field in attrs.fields(ImageOptions):
        assert f"`{field.name}`" in section, field.name


def test_the_class_folder_example_maps_sorted_folder_names_to_label_ids(tmp_path):
    for folder, colour in (("dog", "red"), ("cat", "blue"), ("bird", "green")):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 40), colour).save(tmp_path / folder / f"{i}.png")
    job = load_job(ROOT / "examples" / "class_folders.yaml", [f"data.path={tmp_path}", "model.num_classes=3"])
    dataset = diffcore.build_component("dataset", job.data.type, job.data.config)
    assert list(dataset.class_names) == ["bird", "cat", "dog"]
    labels = sorted((int(dataset[i]["labels"]), float(dataset[i]["pixels"][0].mean())) for i in range(len(dataset)))
    # bird (green) = 0, cat (blue) = 1, dog (red) = 2: red shows only in the dog images' first channel
    assert [label for label, _ in labels] == [0, 0, 1, 1, 2, 2]
    assert all(red > 0.9 for label, red in labels if label == 2) and all(red < -0.9 for label, red in labels if label < 2)
