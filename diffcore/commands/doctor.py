"""``diffcore doctor``: check a job before it runs, in seconds.

It builds the dataset with the same code a run uses (so the bucket table and crops are the ones
training will apply), lists missing optional packages, estimates the latent cache, and takes one
forward and backward at the largest bucket with its peak memory. Anything a run would fail on later
fails here: a user error exits 2 with one message, an out-of-memory or non-finite first loss exits 1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--no-step", action="store_true",
        help="check the job and its data only: do not load the model (no cache estimate, no measured step)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the findings as one JSON object")


def doctor_command(args: argparse.Namespace) -> int:
    import time

    from diffcore.api import build_component
    from diffcore.config.job import load_job
    from diffcore.data.crops import crop_report
    from diffcore.data.sampler import BucketBatchSampler
    from diffcore.doctor.packages import missing
    from diffcore.errors import ConfigError, UserError
    from diffcore.job_checks import job_problems

    job = load_job(args.job, args.overrides)
    problems = job_problems(job)
    if len(problems) == 1:  # one line, as every other user error
        raise UserError(problems[0].message, where=f"{job.source}: {problems[0].path}")
    if problems:
        raise ConfigError(problems, source=job.source)
    notes = _notes(job)
    start = time.perf_counter()
    dataset = build_component("dataset", job.data.type, job.data.config)
    scan_s = time.perf_counter() - start
    # the run's own check that a batch can be formed, before anything heavier
    BucketBatchSampler(dataset, job.train.batch_size, world_size=1, drop_last=job.train.drop_last)
    report = crop_report(dataset)
    found: dict[str, Any] = {"job": args.job, "scan_s": scan_s, **_data(report), "notes": notes}
    found["missing_packages"] = [{"package": w.package, "why": w.why, "required": w.required} for w in missing(job)]
    if not args.no_step:
        from diffcore.doctor.step import build, estimate_cache, measure_step
        from diffcore.training.assemble import largest_example

        ctx = build(job, dataset)
        found["step"] = _asdict(measure_step(ctx, largest_example(dataset)))
        cache_dir = getattr(job.data.config, "cache_dir", None)
        if cache_dir:
            found["cache"] = {"dir": cache_dir, **_asdict(estimate_cache(ctx, report))}
    if args.json:
        print(json.dumps(found, indent=1))
    else:
        print(_text(found))
    return 2 if any(p["required"] for p in found["missing_packages"]) else 0


def _notes(job: Any) -> list[str]:
    """What the run would refuse or change, said now (an fp16 job on a device without fp16 exits 2)."""
    from pathlib import Path

    from diffcore.training.checkpoint import latest_checkpoint
    from diffcore.training.distributed import pick_device
    from diffcore.training.loop import _check_precision

    _check_precision(job, pick_device(job.train.device, 0))
    notes = []
    newest = latest_checkpoint(Path(job.output_dir)) if job.output_dir else None
    if newest is not None:
        notes.append(
            f"{job.output_dir} already holds checkpoints (newest {newest.name}): `diffcore run` needs --resume "
            "to continue it, or choose another output_dir"
        )
    return notes


def _asdict(figures: Any) -> dict[str, Any]:
    import attrs

    return attrs.asdict(figures)


def _data(report: Any) -> dict[str, Any]:
    worst = report.worst
    return {
        "examples": report.examples,
        "buckets": [
            {"height": r.bucket[0], "width": r.bucket[1], "images": r.images, "cropped": r.cropped,
             "downscaled": r.downscaled, "upscaled": r.upscaled, "worst_crop": r.worst_crop}
            for r in report.rows
        ],  # fmt: skip
        "cropped": report.count("cropped"),
        "downscaled": report.count("downscaled"),
        "upscaled": report.count("upscaled"),
        "skipped": [{"path": path, "why": why} for path, why in report.skipped],
        "worst_crop": None if worst is None else {"path": worst.path, "ratio": worst.crop_ratio},
        "images": [
            {"path": f.path, "original": list(f.original), "resized": list(f.resized), "bucket": list(f.bucket),
             "crop_ratio": f.crop_ratio}
            for f in report.fits
        ],  # fmt: skip
    }


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _text(found: dict[str, Any]) -> str:
    lines = [f"{found['job']}: {found['examples']} examples checked in {found['scan_s']:.1f} s"]
    lines.append("  bucket (w x h)   images  cropped  downscaled  upscaled  worst crop")
    for b in found["buckets"]:
        lines.append(
            f"  {b['width']:>5} x {b['height']:<5}  {b['images']:>8}  {b['cropped']:>7}  {b['downscaled']:>10}  "
            f"{b['upscaled']:>8}  {b['worst_crop']:>9.1%}"
        )
    worst = found["worst_crop"]
    summary = f"  {found['cropped']} cropped, {found['downscaled']} downscaled, {found['upscaled']} upscaled, {len(found['skipped'])} skipped"
    if worst is not None and worst["ratio"] > 0:
        summary += f"; worst crop cuts {worst['ratio']:.1%} of {worst['path']}"
    lines.append(summary)
    for item in found["skipped"][:5]:
        lines.append(f"  skipped {item['path']}: {item['why']}")
    if len(found["skipped"]) > 5:
        lines.append(f"  and {len(found['skipped']) - 5} more skipped")
    if "cache" in found:
        c = found["cache"]
        text = f", {c['captions']} captions {_size(c['text_bytes'])}" if c["captions"] else ""
        lines.append(
            f"cache {c['dir']}: about {_size(c['latent_bytes'] + c['text_bytes'])} and {c['seconds']:.1f} s to fill from "
            f"nothing ({c['latents']} latents {_size(c['latent_bytes'])}{text})"
        )
    if "step" in found:
        s = found["step"]
        lines.append(
            f"one forward and backward at bucket {s['bucket'][1]}x{s['bucket'][0]}, batch {s['batch_size']} on {s['device']}"
            f"{'' if s['precision'] == 'no' else ' under ' + s['precision'] + ' autocast'}: "
            f"{s['seconds']:.2f} s, loss {s['loss']:.4g}, peak {_size(s['peak'])} ({s['measured']}; without the "
            f"optimizer's state: {s['trainable']:,} trainable parameters, AdamW keeps 2 fp32 values each)"
        )
    lines += [f"note: {note}" for note in found["notes"]]
    for p in found["missing_packages"]:
        need = "needed" if p["required"] else "optional"
        lines.append(f"missing package ({need}): {p['package']}: {p['why']} (pip install {p['package']})")
    if not any(p["required"] for p in found["missing_packages"]):
        lines.append("ok: nothing here would stop the run")
    return "\n".join(lines)
