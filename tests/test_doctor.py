"""`diffcore doctor` (the preflight) and the cheap checks `diffcore validate` runs before a start-up."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from tests.jobs import tiny_job, write_job


def run_cli(capsys, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line in this process (its start-up is what makes a subprocess slow): status and output."""
    from diffcore.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def draw(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def folder_job(tmp_path: Path, **data: object) -> Path:
    images = tmp_path / "images"
    for i, (w, h) in enumerate([(16, 16), (24, 16), (20, 30)]):
        draw(images / f"{i}.png", w, h, seed=i)
        (images / f"{i}.txt").write_text(f"caption {i}")
    job = tiny_job(tmp_path / "out")
    job["model"] = {"type": "example-tiny", "width": 16}
    job["data"] = {"type": "folder", "path": str(images), "resolution": 16, **data}
    return write_job(tmp_path / "job.yaml", job)


def test_validate_finds_a_resolution_that_makes_no_bucket(tmp_path, capsys):
    out = run_cli(capsys, "validate", str(folder_job(tmp_path)))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "$.data.bucket_step: resolution 16 and bucket_step 64 do not make a bucket" in out.stderr
    assert "set bucket_step between 8 and 16, or buckets: false" in out.stderr
    assert "Traceback" not in out.stderr


def test_without_buckets_the_bucket_step_does_not_matter(tmp_path, capsys):
    job = folder_job(tmp_path, buckets=False)
    out = run_cli(capsys, "validate", str(job))
    assert out.returncode == 0, out.stderr
    from diffcore.api import build_component

    dataset = build_component("dataset", "folder", {"path": str(tmp_path / "images"), "resolution": 16, "buckets": False})
    assert len(dataset) == 3 and {dataset.bucket(i) for i in range(3)} == {(16, 16)}
    assert tuple(dataset[1]["pixels"].shape) == (3, 16, 16)


def test_validate_names_a_missing_data_folder_in_a_mix(tmp_path, capsys):
    job = tiny_job(tmp_path / "out")
    job["data"] = {"type": "mix", "datasets": [{"type": "synthetic"}, {"type": "folder", "path": str(tmp_path / "gone")}]}
    out = run_cli(capsys, "validate", str(write_job(tmp_path / "job.yaml", job)))
    assert out.returncode == 2
    assert f"$.data.datasets[1].path: folder not found: {tmp_path / 'gone'}" in out.stderr


# -- diffcore doctor ----------------------------------------------------------------------------
SIZES = {"square.png": (64, 64), "wide.png": (64, 32), "tall.png": (30, 70), "small.png": (20, 20), "tiny.png": (10, 10), "exact.png": (40, 24)}


def doctor_job(tmp_path: Path, **data: object) -> Path:
    images = tmp_path / "images"
    for cls, names in (("a", ["square.png", "wide.png", "tiny.png"]), ("b", ["tall.png", "small.png", "exact.png"])):
        for name in names:
            draw(images / cls / name, *SIZES[name], seed=len(name))
    job = tiny_job(tmp_path / "out")
    job["model"] = {"type": "example-tiny", "width": 16, "num_classes": 2}
    job["data"] = {"type": "folder", "path": str(images), "resolution": 32, "bucket_step": 8, **data}
    job["train"]["batch_size"] = 2
    return write_job(tmp_path / "job.yaml", job)


def doctor(capsys, *args: str) -> tuple[int, dict]:
    import json

    from diffcore.cli import main

    code = main(["doctor", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else {}


def test_doctor_reports_the_crops_the_dataset_applies(tmp_path, capsys):
    from diffcore.api import build_component
    from diffcore.data.images import fit, load

    code, found = doctor(capsys, str(doctor_job(tmp_path)), "--no-step")
    assert code == 0
    fits = {Path(f["path"]).name: f for f in found["images"]}
    assert set(fits) == set(SIZES) - {"tiny.png"}
    assert [Path(s["path"]).name for s in found["skipped"]] == ["tiny.png"]
    # worked by hand: 64x32 goes to the 40x24 bucket, scaled to 48x24, 8 of 48 columns cut
    assert fits["wide.png"]["bucket"] == [24, 40] and fits["wide.png"]["resized"] == [24, 48]
    assert abs(fits["wide.png"]["crop_ratio"] - 1 / 6) < 1e-9
    assert fits["exact.png"]["crop_ratio"] == 0 and fits["exact.png"]["resized"] == [24, 40]
    # every image: the pixels the dataset trains on are the doctor's resize and centre crop
    dataset = build_component("dataset", "folder", {"path": str(tmp_path / "images"), "resolution": 32, "bucket_step": 8})
    assert len(dataset) == len(fits)
    for i, record in enumerate(dataset.records):
        f = fits[record.image.name]
        (rh, rw), (bh, bw) = f["resized"], f["bucket"]
        expected = fit(load(record.image, "RGB"), (rh, rw), (rh - bh) // 2, (rw - bw) // 2, (bh, bw), False)
        pixels = ((dataset[i]["pixels"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        assert np.array_equal(pixels, expected), record.image.name
        assert f["original"] == [SIZES[record.image.name][1], SIZES[record.image.name][0]]
    # the summary is the images' own
    assert found["cropped"] == sum(f["resized"] != f["bucket"] for f in fits.values()) == 2
    assert found["downscaled"] == sum(f["resized"][0] < f["original"][0] for f in fits.values())
    assert found["worst_crop"]["path"].endswith("tall.png")
    assert found["worst_crop"]["ratio"] == max(f["crop_ratio"] for f in fits.values())
    assert sum(b["images"] for b in found["buckets"]) == len(fits)
    assert {(b["height"], b["width"]) for b in found["buckets"]} == {tuple(f["bucket"]) for f in fits.values()}


def test_doctor_takes_one_step_at_the_largest_bucket(tmp_path, capsys):
    code, found = doctor(capsys, str(doctor_job(tmp_path, cache_dir=str(tmp_path / "cache"))))
    assert code == 0
    step = found["step"]
    assert step["bucket"] == [32, 32] and step["batch_size"] == 2 and step["device"] == "cpu"
    assert np.isfinite(step["loss"]) and step["trainable"] > 0 and step["peak"] >= 0
    # example-tiny works in pixel space: a cached latent is the fp32 image itself
    cache = found["cache"]
    assert cache["latents"] == 5
    assert cache["latent_bytes"] == sum(4 * 3 * b["height"] * b["width"] * b["images"] for b in found["buckets"])
    assert not (tmp_path / "cache" / "latents").exists()  # an estimate: nothing is written


def test_doctor_fails_on_what_the_run_would_fail_on(tmp_path, capsys):
    import importlib.util

    # the first step cannot run: a class-conditional model on captioned images without labels
    job = doctor_job(tmp_path, labels="none", default_caption="x")
    out = run_cli(capsys, "doctor", str(job))
    assert out.returncode == 1
    assert "the first train step fails at bucket 32x32, batch 2: ValueError: example-tiny is class-conditional" in out.stderr
    code, found = doctor(capsys, str(doctor_job(tmp_path)), "--no-step")
    assert [p["package"] for p in found["missing_packages"]] == (["tensorboard"] if importlib.util.find_spec("tensorboard") is None else [])


def test_doctor_on_missing_images_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "meta.jsonl").write_text('{"image": "gone-1.png", "label": 0}\n{"image": "gone-2.png", "label": 1}\n')
    job = tiny_job(tmp_path / "out")
    job["data"] = {"type": "metadata", "file": str(tmp_path / "meta.jsonl"), "resolution": 32, "bucket_step": 8}
    out = run_cli(capsys, "doctor", str(write_job(tmp_path / "job.yaml", job)))
    assert out.returncode == 2
    assert out.stderr == (
        f"diffcore: error: $.data: no usable examples (of 2): {tmp_path / 'gone-1.png'}: file not found; "
        f"{tmp_path / 'gone-2.png'}: file not found (check the path and the files)\n"
    )
    job["data"] = {"type": "folder", "path": str(tmp_path / "nowhere"), "resolution": 32, "bucket_step": 8}
    out = run_cli(capsys, "doctor", str(write_job(tmp_path / "job.yaml", job)))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert f"$.data.path: folder not found: {tmp_path / 'nowhere'}" in out.stderr


def test_doctor_notes_checkpoints_a_run_would_need_resume_for(tmp_path, capsys):
    job = doctor_job(tmp_path)
    (tmp_path / "out" / "checkpoints" / "step-4").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "step-4" / "trainer.json").write_text("{}")
    code, found = doctor(capsys, str(job), "--no-step")
    assert code == 0
    assert found["notes"] == [
        f"{tmp_path / 'out'} already holds checkpoints (newest step-4): `diffcore run` needs --resume to continue it, "
        "or choose another output_dir"
    ]


def test_the_cpu_memory_figure_sees_a_transient_peak():
    import torch

    from diffcore.doctor.step import ResidentPeak

    with ResidentPeak() as rss:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert 48 * 2**20 < rss.growth < 256 * 2**20


def test_doctor_on_a_dataset_without_buckets_of_its_own(tmp_path, capsys):
    # the synthetic dataset has no bucket(i): every example has the first one's size
    code, found = doctor(capsys, str(write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "out"))))
    assert code == 0
    assert found["buckets"] == [{"height": 8, "width": 8, "images": 64, "cropped": 0, "downscaled": 0, "upscaled": 0, "worst_crop": 0.0}]
    assert found["images"] == [] and found["worst_crop"] is None
    assert found["step"]["bucket"] == [8, 8] and found["step"]["batch_size"] == 4
    assert found["step"]["precision"] == "no"
    code, found = doctor(capsys, str(tmp_path / "job.yaml"), "--set", "train.mixed_precision=bf16")
    assert code == 0 and found["step"]["precision"] == "bf16" and np.isfinite(found["step"]["loss"])
