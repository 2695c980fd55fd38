"""Listing examples: a captioned folder, class sub-folders, or a metadata file (no pixels read)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@attrs.frozen
class Record:
    """One example as listed: where its files are and what it says, before any checks."""

    image: Path
    caption: str | None = None
    label: int | None = None
    mask: Path | None = None
    control: Path | None = None
    #: one image, or several in order (a list in a JSON metadata file: multi-reference editing)
    reference: Path | tuple[Path, ...] | None = None
    #: where the example comes from, for messages ("metadata.jsonl:12")
    origin: str = ""


@attrs.frozen
class Listing:
    records: list[Record]
    class_names: list[str] | None = None
    #: examples that could not even be listed (e.g. a missing caption): (path, why)
    problems: list[tuple[str, str]] = attrs.Factory(list)


def _images_under(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith("."):
            yield path


def _read_caption(image: Path, ext: str) -> tuple[str | None, str | None]:
    """(caption, None), (None, None) when there is no caption file, or (None, why) when the file
    cannot be read: a damaged caption is reported, never replaced by ``default_caption``."""
    path = image.with_suffix(ext)
    if not path.is_file():
        return None, None
    try:
        return path.read_text(encoding="utf-8").strip(), None
    except UnicodeDecodeError as exc:
        return None, f"caption {path.name} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
    except OSError as exc:
        return None, f"cannot read caption {path.name}: {exc.strerror or exc}"


def list_folder(
    root: Path, *, labels: str, caption_ext: str, default_caption: str | None, where: str
) -> Listing:
    """A captioned folder (recursive) or, with labels, one sub-folder per class."""
    if not root.is_dir():
        raise UserError(f"folder not found: {root}", where=f"{where}.path", hint="check the path")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if labels == "auto":
        direct = any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir() if p.is_file())
        labels = "folders" if not direct and subdirs else "none"
    records: list[Record] = []
    problems: list[tuple[str, str]] = []
    if labels == "folders":
        names = [d.name for d in subdirs]
        for label, folder in enumerate(subdirs):
            for image in _images_under(folder):
                caption, bad = _read_caption(image, caption_ext)
                if bad is not None:
                    problems.append((str(image), bad))
                    continue
                records.append(Record(image, caption if caption is not None else default_caption, label))
        return Listing(records, names, problems)
    for image in _images_under(root):
        caption, bad = _read_caption(image, caption_ext)
        if bad is not None:
            problems.append((str(image), bad))
            continue
        if caption is None:
            caption = default_caption
            if caption is None:
                problems.append((str(image), f"missing caption {image.with_suffix(caption_ext).name}"))
                continue
        records.append(Record(image, caption))
    return Listing(records, None, problems)


def _rows(file: Path, where: str) -> list[tuple[str, dict[str, Any]]]:
    suffix = file.suffix.lower()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read metadata file: {exc}", where=str(file)) from None
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"invalid JSON: {exc.msg}", where=f"{file}:{n}") from None
            if not isinstance(row, dict):
                raise UserError("each line must be a JSON object", where=f"{file}:{n}")
            rows.append((f"{file.name}:{n}", row))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"invalid JSON: {exc.msg} (line {exc.lineno})", where=str(file)) from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError("metadata.json must hold a list of objects, one per image", where=str(file))
        return [(f"{file.name}[{i}]", r) for i, r in enumerate(data)]
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [(f"{file.name}:{n}", dict(r)) for n, r in enumerate(reader, 2)]
    raise UserError(f"unknown metadata format {suffix!r}", where=str(file), hint="use .jsonl, .json or .csv")


def list_metadata(
    file: Path, *, root: Path | None, columns: dict[str, str], default_caption: str | None, where: str
) -> Listing:
    """Examples from a metadata file; paths are relative to ``root`` (default: the file's folder)."""
    if not file.is_file():
        raise UserError(f"metadata file not found: {file}", where=f"{where}.file", hint="check the path")
    rows = _rows(file, where)
    base = root if root is not None else file.parent
    keys = set().union(*(r.keys() for _, r in rows)) if rows else set()

    def column(name: str, fallback: str) -> str | None:
        wanted = columns[name]
        if wanted in keys:
            return wanted
        return fallback if fallback in keys and wanted == name else None

    image_col = column("image", "file_name")
    if image_col is None:
        raise UserError(
            f"no image column {columns['image']!r} in the metadata (columns: {', '.join(sorted(keys)) or 'none'})",
            where=str(file),
            hint=f"set {where}.image_column",
        )
    caption_col = column("caption", "text")
    label_col, mask_col = column("label", ""), column("mask", "")
    control_col, reference_col = column("control", ""), column("reference", "")

    raw_labels = [r.get(label_col) for _, r in rows] if label_col else []
    class_names: list[str] | None = None
    label_of: dict[Any, int] = {}
    if label_col:
        present = [v for v in raw_labels if v not in (None, "")]
        if all(
            isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, str) and v.isdigit())
            for v in present
        ):
            label_of = {v: int(v) for v in present}
        else:  # names: classes in sorted order
            class_names = sorted({str(v) for v in present})
            label_of = {v: class_names.index(str(v)) for v in present}

    def path_of(value: Any) -> Path | None:
        if value in (None, ""):
            return None
        path = Path(str(value))
        return path if path.is_absolute() else base / path

    def paths_of(value: Any) -> Path | tuple[Path, ...] | None:
        if not isinstance(value, list):
            return path_of(value)
        paths = tuple(p for p in (path_of(v) for v in value) if p is not None)
        return paths or None

    records: list[Record] = []
    problems: list[tuple[str, str]] = []
    for origin, row in rows:
        image = path_of(row.get(image_col))
        if image is None:
            problems.append((origin, "no image path"))
            continue
        caption = row.get(caption_col) if caption_col else None
        if caption in (None, ""):
            caption = default_caption
            if caption is None and caption_col:
                problems.append((str(image), f"missing caption ({origin})"))
                continue
        label = label_of.get(row.get(label_col)) if label_col else None
        records.append(
            Record(
                image,
                None if caption is None else str(caption),
                label,
                path_of(row.get(mask_col)) if mask_col else None,
                path_of(row.get(control_col)) if control_col else None,
                paths_of(row.get(reference_col)) if reference_col else None,
                origin,
            )
        )
    return Listing(records, class_names, problems)
