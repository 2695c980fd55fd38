"""Reading and writing weights: safetensors only, streamed, into modules built on the meta device.

A checkpoint is a single ``.safetensors`` file, a folder holding one (``diffusion_pytorch_model`` or
``model``), or a sharded folder with an ``*.safetensors.index.json``. Tensors are read one at a time,
so loading needs about the checkpoint's own size in memory. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffcore.errors import UserError
from diffcore.quantize.active import current
from diffcore.quantize.reading import read_tensors
from diffcore.quantize.streaming import streamed
from diffcore.quantize.tensors import install

_NAMES = ("diffusion_pytorch_model", "model")


class Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint (file, folder, or sharded folder)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        for file in self._files():
            try:
                with safe_open(str(file), framework="pt") as f:
                    self.metadata.update(f.metadata() or {})
                    for key in f.keys():
                        self._where[key] = file
            except Exception as exc:
                raise UserError(
                    f"cannot read safetensors file: {exc}", where=str(file), hint="is it a complete .safetensors file?"
                ) from None

    def _files(self) -> list[Path]:
        p = self.path
        if not p.exists():
            raise UserError("no such file or folder", where=str(p))
        if p.is_file():
            if p.suffix != ".safetensors":
                raise UserError(
                    "only .safetensors weights are read (pickled .ckpt/.bin/.pt files are never loaded)",
                    where=str(p),
                    hint="convert it to safetensors first",
                )
            return [p]
        for name in _NAMES:
            index = p / f"{name}.safetensors.index.json"
            if index.exists():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return [p / s for s in shards]
            single = p / f"{name}.safetensors"
            if single.exists():
                return [single]
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found
        raise UserError(
            "no safetensors weights found in this folder", where=str(p), hint="expected diffusion_pytorch_model.safetensors"
        )

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def items(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """(key without ``prefix``, tensor) for every key starting with ``prefix``, file by file."""
        by_file: dict[Path, list[str]] = {}
        for key, file in self._where.items():
            if key.startswith(prefix):
                by_file.setdefault(file, []).append(key)
        for file, keys in by_file.items():
            if current() is not None:
                # a quantised load: no mapping of the file stays resident while it streams
                yield from ((key[len(prefix) :], tensor) for key, tensor in read_tensors(file, keys))
                continue
            with safe_open(str(file), framework="pt") as f:
                for key in keys:
                    yield key[len(prefix) :], f.get_tensor(key)


def has_prefix(checkpoint: Checkpoint, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in checkpoint.keys())


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Create modules on the meta device: no memory, no random init; fill them with :func:`load_into`."""
    with torch.device("meta"):
        yield


def load_into(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
    *,
    where: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    rename: Callable[[str], str | None] | None = None,
) -> nn.Module:
    """Fill ``module`` (possibly on the meta device) from ``tensors``, one tensor at a time.

    ``rename`` maps a file key to a module key (None drops it). With ``strict``, missing or
    unexpected keys and wrong shapes raise one :class:`UserError` naming the first few.
    Floating tensors are cast to ``dtype`` when given, else to the parameter's dtype.
    """
    own: dict[str, torch.Tensor] = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    seen: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for key, value in items:
        name = rename(key) if rename else key
        if name is None:
            continue
        if name not in own:
            unexpected.append(key)
            continue
        target = own[name]
        if tuple(target.shape) != tuple(value.shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
            continue
        cast = dtype if (dtype is not None and value.is_floating_point()) else (
            target.dtype if value.is_floating_point() else value.dtype
        )
        value = value.to(device=device, dtype=cast)
        # under model.quantize, a selected Linear weight is stored quantised as soon as it is read
        quantized = streamed(module, name, value)
        if quantized is None:
            _assign(module, name, value)
        else:
            install(module, name, quantized)
        seen.add(name)
    missing = [k for k in own if k not in seen]
    persistent_missing = [k for k in missing if not _is_nonpersistent_buffer(module, k)]
    if strict and (unexpected or mismatched or persistent_missing):
        parts = []
        if persistent_missing:
            parts.append(f"{len(persistent_missing)} missing (e.g. {', '.join(persistent_missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} of the wrong shape (e.g. {'; '.join(mismatched[:3])})")
        raise UserError(
            "weights do not match the model: " + ", ".join(parts),
            where=where,
            hint="is this checkpoint for this architecture and configuration?",
        )
    # Any meta tensor still left (non-persistent buffers) is materialised empty for the caller to set.
    for name in missing:
        tensor = own[name]
        if tensor.is_meta:
            _assign(module, name, torch.zeros(tensor.shape, dtype=tensor.dtype, device=device))
    return module


def _is_nonpersistent_buffer(module: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf in getattr(owner, "_non_persistent_buffers_set", set())


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    else:
        owner._buffers[leaf] = value


def _sort_metadata(path: str) -> None:
    """Rewrite the header's ``__metadata__`` in sorted key order, in place.

    safetensors keeps the metadata in a hash map whose order changes from process to process, so the
    same tensors and metadata would give files that differ in their header bytes alone. Sorting makes
    a resumed run's files byte-identical to a straight run's. The rewritten header has the same
    length (only the order of its entries changes), so the tensor data is not moved.
    """
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(size)
        header = json.loads(raw, object_pairs_hook=dict)
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # never the case for a reordering; keep the library's header then
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` atomically (temp file, fsync, rename): a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        _sort_metadata(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
