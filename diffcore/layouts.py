"""Which architecture and layout a weights file or folder is in, from its tensor names (torch-free).

A :class:`LayoutProbe` reads only safetensors headers (names, shapes, dtypes, metadata) and the JSON
configs of a diffusers folder, so probing a 12B checkpoint costs milliseconds. Detection is explicit:
every registered model answers through its ``ModelSpec.detect`` and every adapter through its
``AdapterSpec.detect`` (docs/plugin-api.md); nothing is guessed in the kernel. ``diffcore convert``
uses it to pick what to convert and to name what it saw when nothing claims a file.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import UserError

#: the largest safetensors header read (the format caps it at 100 MB)
_MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@attrs.frozen
class LayoutProbe:
    """What detection looks at.

    ``shapes``: every tensor's shape by name. A single file's names are its own; a folder's are
    ``"<component>/<name>"`` for each subfolder holding weights (``unet/conv_in.weight``), and bare
    when the folder itself is one component (config.json beside the weights). ``configs``: the
    folder's JSON configs, ``"model_index"`` and ``"<component>"`` (``""``: the folder's own
    config.json). ``metadata``: the safetensors header metadata of the files read.
    """

    path: Path
    is_file: bool
    shapes: Mapping[str, tuple[int, ...]]
    configs: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    metadata: Mapping[str, str] = attrs.Factory(dict)
    dtypes: Mapping[str, int] = attrs.Factory(dict)

    def has(self, *names: str) -> bool:
        """Every one of ``names`` is a tensor of the probe."""
        return all(n in self.shapes for n in names)

    def component(self, name: str) -> dict[str, tuple[int, ...]]:
        """The tensors of diffusers component ``name`` by their own names: a folder's ``name/``
        subfolder, or the probe's bare names (a component folder or a single file)."""
        prefix = f"{name}/"
        inside = {k[len(prefix) :]: v for k, v in self.shapes.items() if k.startswith(prefix)}
        if inside:
            return inside
        return {k: v for k, v in self.shapes.items() if "/" not in k}

    @property
    def dtype(self) -> str | None:
        """The floating dtype most tensors have ("float32", "bfloat16", "float16"), None if none."""
        floats = {d: n for d, n in self.dtypes.items() if d in _DTYPES.values()}
        return max(floats, key=lambda d: floats[d]) if floats else None


def read_header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], Counter[str]]:
    """A safetensors file's tensor shapes, metadata and dtype counts, from its header alone."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(
            f"cannot read safetensors file: {exc}", where=str(file), hint="is it a complete .safetensors file?"
        ) from None
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in header.items()}
    dtypes = Counter(_DTYPES.get(v["dtype"], v["dtype"]) for v in header.values())
    return shapes, {str(k): str(v) for k, v in metadata.items()}, dtypes


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read JSON: {exc}", where=str(file)) from None
    return value if isinstance(value, dict) else {}


def probe(path: str | Path) -> LayoutProbe:
    """Read what detection needs from a ``.safetensors`` file or a (diffusers) folder."""
    path = Path(path)
    if not path.exists():
        raise UserError("no such file or folder", where=str(path))
    shapes: dict[str, tuple[int, ...]] = {}
    metadata: dict[str, str] = {}
    dtypes: Counter[str] = Counter()
    configs: dict[str, dict[str, Any]] = {}

    def read(file: Path, prefix: str) -> None:
        s, m, d = read_header(file)
        shapes.update({prefix + k: v for k, v in s.items()})
        metadata.update(m)
        dtypes.update(d)

    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(
                "only .safetensors files are read (pickled .ckpt/.bin/.pt files are never loaded)",
                where=str(path),
                hint="convert it to safetensors first",
            )
        read(path, "")
        return LayoutProbe(path, True, shapes, configs, metadata, dict(dtypes))
    if (path / "model_index.json").is_file():
        configs["model_index"] = _json(path / "model_index.json")
    if (path / "config.json").is_file():
        configs[""] = _json(path / "config.json")
    for file in _weight_files(path):
        read(file, "")
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        files = _weight_files(sub)
        if (sub / "config.json").is_file():
            configs[sub.name] = _json(sub / "config.json")
        for file in files:
            read(file, f"{sub.name}/")
    return LayoutProbe(path, False, shapes, configs, metadata, dict(dtypes))


@attrs.frozen
class Detection:
    """One registered component's claim on a probe: ``kind`` "model" or "adapter", its ``name`` and
    the ``layout`` it read (a model's "original"/"diffusers", an adapter's file format)."""

    kind: str
    name: str
    layout: str


def detect(found: LayoutProbe, registry: Any = None) -> list[Detection]:
    """Every installed model and adapter that recognises ``found`` (adapters first)."""
    if registry is None:
        from diffcore.registry import get_registry

        registry = get_registry()
    out = []
    for kind in ("adapter", "model"):
        for name in registry.names(kind):
            spec = registry.components[kind][name].spec
            if spec.detect is None:
                continue
            layout = spec.detect(found)
            if layout is not None:
                out.append(Detection(kind, name, layout))
    return out


def describe(found: LayoutProbe) -> str:
    """What a probe holds, in words, for a message when nothing recognises it."""
    if not found.shapes:
        return "no tensors at all" + ("" if found.is_file else " (no .safetensors files in it or its subfolders)")
    roots = Counter(k.split("/", 1)[0] + "/" if "/" in k else k.split(".", 1)[0] for k in found.shapes)
    common = ", ".join(f"{name} ({n})" for name, n in roots.most_common(4))
    kind = "a single file" if found.is_file else "a folder"
    extra = ""
    cls = found.configs.get("model_index", found.configs.get("", {})).get("_class_name")
    if cls:
        extra = f", its config names {cls}"
    return f"{kind} of {len(found.shapes)} tensors whose names start with {common}{extra}"
