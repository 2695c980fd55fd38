"""Bad data: corrupt, truncated, unreadable, caption-less and too small files are skipped and reported,
or stop the job with a clear error naming the file, as the job chooses; never a crash mid-run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.api import build_component
from diffcore.data.collate import collate
from diffcore.data.sampler import BucketBatchSampler
from diffcore.errors import UserError


def draw_image(path: Path, width: int, height: int, seed: int = 0, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, fmt)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def messy(tmp_path):
    for i in range(4):
        draw_image(tmp_path / f"good{i}.png", 64, 64, seed=i)
        (tmp_path / f"good{i}.txt").write_text(f"good {i}")
    truncate(draw_image(tmp_path / "cut.png", 64, 64))
    (tmp_path / "cut.txt").write_text("cut")
    (tmp_path / "text.png").write_text("this is not an image")
    (tmp_path / "text.txt").write_text("fake")
    draw_image(tmp_path / "nocaption.png", 64, 64)
    draw_image(tmp_path / "tiny.png", 20, 20)
    (tmp_path / "tiny.txt").write_text("tiny")
    return tmp_path


def options(path: Path, **extra) -> dict:
    return {"path": str(path), "resolution": 64, "bucket_step": 16, "min_side": 32, **extra}


def test_skip_reports_count_paths_and_reasons(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="diffcore.data"):
        ds = build_component("dataset", "folder", options(messy))
    assert len(ds) == 4
    reasons = {Path(p.path).name: p.reason for p in ds.problems}
    assert set(reasons) == {"cut.png", "text.png", "nocaption.png", "tiny.png"}
    assert "corrupt or truncated" in reasons["cut.png"]
    assert "not an image" in reasons["text.png"]
    assert "missing caption nocaption.txt" in reasons["nocaption.png"]
    assert "20x20, below the minimum size" in reasons["tiny.png"]
    message = caplog.text
    assert "skipped 4 of 8 examples" in message and str(messy / "cut.png") in message


def test_error_mode_names_the_file(messy):
    with pytest.raises(UserError) as info:
        build_component("dataset", "folder", options(messy, on_bad_data="error"))
    err = info.value
    assert err.where in {str(messy / n) for n in ("cut.png", "text.png", "nocaption.png", "tiny.png")}
    assert "3 other bad examples" in err.message and "on_bad_data: skip" in err.hint


def test_a_default_caption_fills_missing_ones(messy):
    ds = build_component("dataset", "folder", options(messy, default_caption="a photo"))
    captions = [ds[i]["captions"] for i in range(len(ds))]
    assert len(ds) == 5 and "a photo" in captions


def test_missing_files_in_metadata(tmp_path):
    draw_image(tmp_path / "a.png", 64, 64)
    rows = [{"image": "a.png", "caption": "a"}, {"image": "gone.png", "caption": "b"}, {"image": "a.png"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_component("dataset", "metadata", {"file": str(tmp_path / "m.jsonl"), "resolution": 64})
    assert len(ds) == 1
    assert [(Path(p.path).name, p.reason) for p in ds.problems] == [
        ("a.png", "missing caption (m.jsonl:3)"),
        ("gone.png", "file not found"),
    ]


def test_a_truncated_jpeg_found_while_training_is_replaced_not_fatal(tmp_path, caplog):
    for i in range(3):
        draw_image(tmp_path / f"{i}.png", 64, 64, seed=i)
        (tmp_path / f"{i}.txt").write_text(f"ok {i}")
    truncate(draw_image(tmp_path / "late.jpg", 64, 64, fmt="JPEG"))  # Pillow's header check passes
    (tmp_path / "late.txt").write_text("late")
    ds = build_component("dataset", "folder", options(tmp_path))
    assert len(ds) == 4 and ds.problems == []
    sampler = BucketBatchSampler(ds, 2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    with caplog.at_level(logging.WARNING, logger="diffcore.data"):
        batches = [b for b, _ in zip(loader, range(4))]
    captions = [c for b in batches for c in b["captions"]]
    assert "late" not in captions and len(captions) == 8
    assert "late.jpg" in caplog.text
    assert [Path(p.path).name for p in ds.problems] == ["late.jpg"]

    strict = build_component("dataset", "folder", options(tmp_path, on_bad_data="error"))
    late = [r.image.name for r in strict.records].index("late.jpg")
    with pytest.raises(UserError, match="cannot load image") as info:
        strict[late]
    assert info.value.where == str(tmp_path / "late.jpg")
    # a decoding scan finds it before training starts
    scanned = build_component("dataset", "folder", options(tmp_path, scan="decode"))
    assert len(scanned) == 3 and "truncated" in scanned.problems[0].reason


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "x.png").write_text("nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match=r"no usable examples \(of 1\)"):
        build_component("dataset", "folder", options(tmp_path))
    with pytest.raises(UserError, match="folder not found"):
        build_component("dataset", "folder", options(tmp_path / "nowhere"))


@pytest.mark.parametrize("default_caption", [None, "a photo"])
def test_a_caption_that_is_not_utf8_is_reported_not_replaced(tmp_path, default_caption):
    for name in ("good", "latin1"):
        draw_image(tmp_path / f"{name}.png", 64, 64)
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    ds = build_component("dataset", "folder", options(tmp_path, default_caption=default_caption))
    assert [ds[i]["captions"] for i in range(len(ds))] == ["fine"]
    assert [(Path(p.path).name, p.reason) for p in ds.problems] == [
        ("latin1.png", "caption latin1.txt is not UTF-8 text (byte 3: unexpected end of data); save it as UTF-8")
    ]
    with pytest.raises(UserError) as err:
        build_component("dataset", "folder", options(tmp_path, default_caption=default_caption, on_bad_data="error"))
    assert err.value.where == str(tmp_path / "latin1.png") and "not UTF-8" in err.value.message
