"""Each dataset source format: captioned folder, class folders, metadata jsonl/json/csv, mix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.api import build_component
from diffcore.errors import ConfigError, UserError


def draw_image(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def folder(options: dict) -> object:
    return build_component("dataset", "folder", {"resolution": 64, "bucket_step": 16, **options})


def test_captioned_folder(tmp_path):
    for i, (w, h) in enumerate([(64, 64), (96, 48), (48, 96)]):
        draw_image(tmp_path / f"img{i}.png", w, h, seed=i)
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    draw_image(tmp_path / "sub" / "deep.jpg", 80, 80)
    (tmp_path / "sub" / "deep.txt").write_text("deep one")
    ds = folder({"path": str(tmp_path)})
    assert len(ds) == 4 and ds.class_names is None
    captions = sorted(ds[i]["captions"] for i in range(len(ds)))
    assert captions == ["caption 0", "caption 1", "caption 2", "deep one"]
    for i in range(len(ds)):
        x = ds[i]
        assert set(x) == {"pixels", "captions"}
        assert x["pixels"].dtype == torch.float32 and x["pixels"].shape == (3, *ds.bucket(i))
        assert -1.0 <= x["pixels"].min() and x["pixels"].max() <= 1.0


def test_pixels_match_the_image(tmp_path):
    # A bucket-sized image passes through unchanged: pixels are exactly img / 127.5 - 1.
    draw_image(tmp_path / "a.png", 64, 64, seed=3)
    (tmp_path / "a.txt").write_text("a")
    ds = folder({"path": str(tmp_path)})
    expected = torch.from_numpy(np.array(Image.open(tmp_path / "a.png"))).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(ds[0]["pixels"], expected)


def test_class_folders_auto_and_explicit(tmp_path):
    for name in ("cat", "dog"):
        for i in range(2):
            draw_image(tmp_path / name / f"{i}.png", 64, 64, seed=i)
    ds = folder({"path": str(tmp_path)})
    assert ds.class_names == ["cat", "dog"]
    labels = sorted(ds[i]["labels"] for i in range(len(ds)))
    assert labels == [0, 0, 1, 1] and "captions" not in ds[0]
    # labels: none makes the sub-folders part of one captioned folder (captions then required)
    ds = folder({"path": str(tmp_path), "labels": "none", "default_caption": "pet"})
    assert ds.class_names is None and ds[0]["captions"] == "pet" and "labels" not in ds[0]


def _metadata_rows(tmp_path: Path) -> list[dict]:
    draw_image(tmp_path / "imgs" / "a.png", 64, 64, seed=1)
    draw_image(tmp_path / "imgs" / "b.png", 64, 64, seed=2)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask, "L").save(tmp_path / "imgs" / "a_mask.png")
    Image.fromarray(255 - mask, "L").save(tmp_path / "imgs" / "b_mask.png")
    draw_image(tmp_path / "imgs" / "a_ctl.png", 32, 32, seed=5)
    draw_image(tmp_path / "imgs" / "b_ctl.png", 32, 32, seed=6)
    return [
        {
            "image": "imgs/a.png",
            "caption": "first",
            "label": "zebra",
            "mask": "imgs/a_mask.png",
            "control": "imgs/a_ctl.png",
        },
        {
            "image": "imgs/b.png",
            "caption": "second",
            "label": "ant",
            "mask": "imgs/b_mask.png",
            "control": "imgs/b_ctl.png",
        },
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_metadata_formats(tmp_path, fmt):
    rows = _metadata_rows(tmp_path)
    file = tmp_path / f"metadata.{fmt}"
    if fmt == "jsonl":
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        file.write_text(json.dumps(rows))
    else:
        with open(file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    ds = build_component("dataset", "metadata", {"file": str(file), "resolution": 64, "bucket_step": 16})
    assert len(ds) == 2 and ds.class_names == ["ant", "zebra"]
    a, b = ds[0], ds[1]
    assert (a["captions"], a["labels"], b["captions"], b["labels"]) == ("first", 1, "second", 0)
    assert a["mask"].shape == (1, 64, 64) and a["control"].shape == (3, 64, 64)
    # the mask keeps its left half on, in [0, 1]
    assert a["mask"][0, :, :30].min() == 1.0 and a["mask"][0, :, 34:].max() == 0.0
    assert b["mask"][0, :, :30].max() == 0.0


def test_metadata_flip_moves_mask_and_control_with_the_image(tmp_path):
    rows = _metadata_rows(tmp_path)
    file = tmp_path / "metadata.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"file": str(file), "resolution": 64, "bucket_step": 16}
    plain = build_component("dataset", "metadata", options)
    flipped = build_component("dataset", "metadata", {**options, "flip": 1.0})
    for key in ("pixels", "mask", "control"):
        torch.testing.assert_close(flipped[0][key], plain[0][key].flip(-1))


def test_metadata_hugging_face_column_names_and_errors(tmp_path):
    draw_image(tmp_path / "x.png", 64, 64)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "hello"}) + "\n")
    ds = build_component("dataset", "metadata", {"file": str(tmp_path / "metadata.jsonl"), "resolution": 64})
    assert ds[0]["captions"] == "hello"
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        build_component("dataset", "metadata", {"file": str(tmp_path / "bad.jsonl")})
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"picture": "x.png"}) + "\n")
    with pytest.raises(UserError, match="no image column 'image'.*picture"):
        build_component("dataset", "metadata", {"file": str(tmp_path / "nocol.jsonl")})


def test_mix_weights_and_repeats(tmp_path):
    for i in range(4):
        draw_image(tmp_path / "a" / f"{i}.png", 64, 64, seed=i)
        (tmp_path / "a" / f"{i}.txt").write_text(f"a{i}")
    for i in range(2):
        draw_image(tmp_path / "b" / f"{i}.png", 64, 64, seed=10 + i)
        (tmp_path / "b" / f"{i}.txt").write_text(f"b{i}")
    base = {"type": "folder", "resolution": 64, "bucket_step": 16}
    ds = build_component(
        "dataset",
        "mix",
        {
            "datasets": [
                {**base, "path": str(tmp_path / "a"), "weight": 0.5},
                {**base, "path": str(tmp_path / "b"), "repeats": 3},
            ]
        },
    )
    captions = [ds[i]["captions"] for i in range(len(ds))]
    assert len(ds) == 2 + 6
    assert len({c for c in captions if c.startswith("a")}) == 2  # half of a, no duplicates
    assert sorted(c for c in captions if c.startswith("b")) == ["b0", "b0", "b0", "b1", "b1", "b1"]


def test_mix_errors_carry_paths(tmp_path):
    with pytest.raises(
        ConfigError, match=r"\$\.data\.datasets\[0\]\.resolutoin: unknown key; did you mean 'resolution'"
    ):
        build_component(
            "dataset", "mix", {"datasets": [{"type": "folder", "path": str(tmp_path), "resolutoin": 3}]}
        )
    with pytest.raises(UserError, match=r"\$\.data\.datasets\[0\]\.type.*unknown dataset 'foldr'"):
        build_component("dataset", "mix", {"datasets": [{"type": "foldr", "path": str(tmp_path)}]})


def test_mix_of_different_fields_never_shares_a_bucket(tmp_path):
    draw_image(tmp_path / "cap" / "0.png", 64, 64)
    (tmp_path / "cap" / "0.txt").write_text("c")
    draw_image(tmp_path / "cls" / "k" / "0.png", 64, 64)
    base = {"type": "folder", "resolution": 64, "bucket_step": 16}
    ds = build_component(
        "dataset",
        "mix",
        {"datasets": [{**base, "path": str(tmp_path / "cap")}, {**base, "path": str(tmp_path / "cls")}]},
    )
    assert ds.bucket(0) != ds.bucket(1)


def test_registration_is_torch_free():
    import subprocess
    import sys

    code = (
        "import sys; from diffcore.builtin.datasets import records; "
        "assert {r.name for r in records()} >= {'folder', 'metadata', 'mix'}; "
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
