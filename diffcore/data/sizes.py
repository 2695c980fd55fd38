"""Image sizes remembered between runs, so a large dataset's start-up check is a ``stat`` per file.

Kept in the cache directory as ``image-sizes.json``: absolute path -> [bytes, mtime_ns, height,
width, decoded]. A file whose size or modification time changed is checked again; bad files are
not remembered (they are rare, and a fixed file should be picked up).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from diffcore.data.images import probe


class SizeMemo:
    """``probe`` with a memory on disk; ``save()`` writes what was learned."""

    def __init__(self, path: Path | None):
        self.path = path
        self.known: dict[str, list[Any]] = {}
        if path is not None and path.is_file():
            try:
                self.known = json.loads(path.read_text())
            except (OSError, ValueError):
                self.known = {}
        self.dirty = False

    def probe(self, file: Path, *, decode: bool) -> tuple[int, int]:
        if self.path is None:
            return probe(file, decode=decode)
        try:
            stat = file.stat()
            name = str(file.resolve())
        except OSError:
            return probe(file, decode=decode)  # raises the right BadImage
        seen = self.known.get(name)
        if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns and (seen[4] or not decode):
            return seen[2], seen[3]
        height, width = probe(file, decode=decode)
        self.known[name] = [stat.st_size, stat.st_mtime_ns, height, width, decode]
        self.dirty = True
        return height, width

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs the next run a full check
        self.dirty = False
