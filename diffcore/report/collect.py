"""What a run's output directory holds, read without torch: metrics, samples, job, versions, checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import UserError
from diffcore.training.manifest import MANIFEST, damage

_STEP = re.compile(r"^step-(\d+)$")
#: images shown per sample folder, and sample folders shown (the newest; the rest are counted): a
#: page of thousands of images is no report, and the training callback rereads what it shows
SHOWN_PER_FOLDER = 64
FOLDERS_SHOWN = 24


@attrs.frozen
class Sample:
    """One image: its path relative to the output directory, its size and its PNG text chunks."""

    path: str
    width: int
    height: int
    text: dict[str, str]


@attrs.frozen
class SampleFolder:
    name: str  # "step-200", "final"
    step: int | None
    images: list[Sample]
    more: int  # images not shown


@attrs.frozen
class Checkpoint:
    step: int
    path: str
    size: int
    written: str
    #: "intact", "no manifest (older checkpoint)", or what damage() found
    state: str
    intact: bool


@attrs.frozen
class RunFiles:
    """Everything the report shows, read from one output directory."""

    output_dir: Path
    name: str
    total_steps: int | None
    metrics: list[dict[str, Any]]
    samples: list[SampleFolder]
    #: sample folders left out (older than the FOLDERS_SHOWN newest)
    older_samples: int
    job_text: str
    versions: dict[str, str]
    versions_from: str
    checkpoints: list[Checkpoint]
    #: quality.json (the class_agreement callback's figures), when the run wrote one
    quality: dict[str, Any] = attrs.Factory(dict)


def is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("job.yaml", "metrics.jsonl", "checkpoints"))


def collect(output_dir: Path, *, intact_memo: dict[tuple[str, int], tuple[str, bool]] | None = None) -> RunFiles:
    """Read ``output_dir``; raises :class:`UserError` when it is not a run's output directory.

    ``intact_memo`` keeps checksum verdicts between calls (the training callback rewrites the page
    often; a checkpoint is checked once per modification time, not at every rewrite).
    """
    if not output_dir.is_dir():
        raise UserError("folder not found", where=str(output_dir), hint="pass a run's output_dir")
    if not is_run(output_dir):
        raise UserError(
            "not a diffcore run: no job.yaml, metrics.jsonl or checkpoints/ in it",
            where=str(output_dir),
            hint="pass the output_dir of a job that has started",
        )
    job_text, job = _read_job(output_dir / "job.yaml")
    checkpoints = _checkpoints(output_dir, intact_memo if intact_memo is not None else {})
    samples, older = _samples(output_dir)
    versions, versions_from = _versions(output_dir, checkpoints)
    train = job.get("train")
    total = train.get("steps") if isinstance(train, dict) else None
    return RunFiles(
        output_dir=output_dir,
        name=str(job.get("name") or output_dir.name),
        total_steps=total if isinstance(total, int) else None,
        metrics=_metrics(output_dir / "metrics.jsonl"),
        samples=samples,
        older_samples=older,
        job_text=job_text,
        versions=versions,
        versions_from=versions_from,
        checkpoints=checkpoints,
        quality=_quality(output_dir / "quality.json"),
    )


def _quality(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_job(path: Path) -> tuple[str, dict[str, Any]]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return "", {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    return text, data if isinstance(data, dict) else {}


def _metrics(path: Path) -> list[dict[str, Any]]:
    """The logged rows by step; a step logged twice (a resumed run) keeps its last row."""
    rows: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line half-written while training: the next rewrite has it whole
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = {k: v for k, v in row.items() if _finite(v) or not isinstance(v, float)}
    return [rows[step] for step in sorted(rows)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _samples(output_dir: Path) -> tuple[list[SampleFolder], int]:
    """The newest sample folders, oldest first (final last), and how many older ones are left out."""
    root = output_dir / "samples"
    if not root.is_dir():
        return [], 0
    found: list[tuple[float, Path]] = []
    for child in root.iterdir():
        match = _STEP.match(child.name)
        if child.is_dir() and (match or child.name == "final"):
            found.append((int(match.group(1)) if match else math.inf, child))
    found.sort(key=lambda item: item[0])
    shown = found[-FOLDERS_SHOWN:]
    folders = []
    for order, child in shown:
        pngs = sorted(p for p in child.iterdir() if p.suffix.lower() == ".png" and p.is_file())
        singles = [p for p in pngs if not p.name.startswith("grid")]
        chosen = singles or pngs  # the tiled grid only when there are no single images
        images = [s for s in (_sample(output_dir, p) for p in chosen[:SHOWN_PER_FOLDER]) if s is not None]
        step = None if order == math.inf else int(order)
        folders.append(SampleFolder(child.name, step, images, len(chosen) - len(images)))
    return folders, len(found) - len(shown)


def _sample(output_dir: Path, path: Path) -> Sample | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            text = {str(k): str(v) for k, v in getattr(img, "text", {}).items()}
    except (OSError, SyntaxError, ValueError):
        return None  # a file still being written; the next rewrite shows it
    return Sample(path.relative_to(output_dir).as_posix(), width, height, text)


def _checkpoints(output_dir: Path, memo: dict[tuple[str, int], tuple[str, bool]]) -> list[Checkpoint]:
    root = output_dir / "checkpoints"
    found: list[Checkpoint] = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        match = _STEP.match(child.name)
        trainer = child / "trainer.json"
        if not match or not trainer.is_file():
            continue  # half-written (.tmp-step-N) folders are not checkpoints
        size = 0
        for dirpath, _, names in os.walk(child):
            for name in names:
                try:
                    size += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        mtime = trainer.stat().st_mtime_ns
        key = (str(child), mtime)
        if key not in memo:
            memo[key] = _state(child)
        state, intact = memo[key]
        written = datetime.fromtimestamp(mtime / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        found.append(Checkpoint(int(match.group(1)), child.relative_to(output_dir).as_posix(), size, written, state, intact))
    return sorted(found, key=lambda c: c.step)


def _state(folder: Path) -> tuple[str, bool]:
    if not (folder / MANIFEST).is_file():
        return "no manifest (written before checkpoints carried one)", True
    # the EMA file is optional to a resume, not to a checkpoint's integrity: check every listed file
    problems = damage(folder)
    if not problems:
        return "intact", True
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "damaged: " + "; ".join(problems[:3]) + more, False


def _versions(output_dir: Path, checkpoints: list[Checkpoint]) -> tuple[dict[str, str], str]:
    for checkpoint in reversed(checkpoints):
        try:
            state = json.loads((output_dir / checkpoint.path / "trainer.json").read_text())
        except (OSError, ValueError):
            continue
        versions = state.get("versions") if isinstance(state, dict) else None
        if isinstance(versions, dict) and versions:
            return {str(k): str(v) for k, v in versions.items()}, f"{checkpoint.path}/trainer.json"
    from diffcore.registry import get_registry

    return get_registry().versions(), "the installed plugins (no checkpoint records them yet)"
