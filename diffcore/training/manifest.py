"""Checkpoints that prove themselves: a manifest of every file with its size and checksum.

``manifest.json`` is written last into a checkpoint folder (before the folder is renamed into place).
On resume the newest checkpoint is checked against it; a damaged one is named and skipped. The
checksum is BLAKE2b (hashlib, no extra dependency), which reads at disk speed, so checking costs
about one read of the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from pathlib import Path

MANIFEST = "manifest.json"
_ALGORITHM = "blake2b-128"
_CHUNK = 1 << 22


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if rel != MANIFEST:
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def write_manifest(folder: Path) -> None:
    """Record every file under ``folder`` (size and checksum) in ``folder/manifest.json``."""
    entries = {}
    for rel in _files(folder):
        path = folder / rel
        entries[rel] = {"size": path.stat().st_size, "blake2b": _digest(path)}
    text = json.dumps({"algorithm": _ALGORITHM, "files": entries}, indent=1, sort_keys=True)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / MANIFEST)


def damage(folder: Path, *, unused: Collection[str] = ()) -> list[str]:
    """What is wrong with ``folder`` against its manifest, one line per file; empty when intact.

    A file listed in ``unused`` (a part the job no longer uses, such as the EMA) may be missing.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = manifest["files"]
        if manifest.get("algorithm") != _ALGORITHM or not isinstance(entries, dict):
            return [f"{MANIFEST}: not a manifest this version writes"]
    except FileNotFoundError:
        return [f"{MANIFEST}: missing"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST}: unreadable ({type(exc).__name__})"]
    problems = []
    for rel, entry in sorted(entries.items()):
        path = folder / rel
        if not path.is_file():
            if rel not in unused:
                problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{rel}: {size} bytes, {entry.get('size')} written")
        elif _digest(path) != entry.get("blake2b"):
            problems.append(f"{rel}: contents changed since written (checksum differs)")
    return problems
