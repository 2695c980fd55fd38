"""Latent and text-encoder caches: encoder outputs kept on disk as safetensors shards.

Every entry is keyed by what it was made from and what made it: a latent by the image file's
content hash, the geometry it was cut to (bucket, resize, crop) and the flip; a text-encoder output
by the caption; both by ``encoder_id`` (say, the model type, pretrained path, config hash and
dtype). So one cache directory serves any number of runs and jobs, and a changed image, caption,
resolution or encoder only adds the entries that changed. Shards are written atomically under
unique names (``shard-<uuid>.safetensors``), so two jobs can fill one cache at the same time.

How the training loop uses it::

    cache = FeatureCache(dataset, dataset.cache_dir, encoder_id_for_job(job))
    if cache.needs_autoencoder or cache.needs_text_encoders:
        cache.build(model)              # or tell the user to run `diffcore cache JOB.yaml`
    dataset = cache.wrap(dataset)       # yields "latents" and "cond" instead of "pixels"/"captions"

``cache.complete`` (no entry missing) means training needs neither the autoencoder nor the text
encoders: check ``needs_autoencoder`` / ``needs_text_encoders`` *before* loading the model and skip
loading those parts. Captions whose tags are shuffled differ every epoch and cannot be cached:
then ``needs_text_encoders`` stays true and the wrapped dataset keeps ``captions``. A random crop
cannot be cached either (construction raises a UserError).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffcore.data.transforms import Draw
from diffcore.errors import UserError

log = logging.getLogger("diffcore.data")

VERSION = "diffcore-cache-1"


def _digest(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, separators=(",", ":")).encode(), digest_size=20).hexdigest()


def encoder_identity(model_type: str, options: Mapping[str, Any], dtype: str = "") -> str:
    """An encoder id from a model section: its type, a hash of its options, and the dtype."""
    return f"{model_type}:{_digest(dict(options))}:{dtype}"


def encoder_id_for_job(job: Any) -> str:
    """The encoder id of a job's model section (what `diffcore cache` and the loop both use)."""
    section = job.model.to_dict()
    model_type = section.pop("type")
    return encoder_identity(model_type, section, getattr(job.train, "mixed_precision", ""))


class FileHashes:
    """Content hashes of files, remembered by (path, size, mtime) so unchanged files are not re-read."""

    def __init__(self, path: Path):
        self.path = path
        self.known: dict[str, list[Any]] = {}
        if path.is_file():
            try:
                self.known = json.loads(path.read_text())
            except (OSError, ValueError):
                self.known = {}
        self.dirty = False

    def __call__(self, file: Path) -> str:
        stat = file.stat()
        name = str(file.resolve())
        seen = self.known.get(name)
        if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
            return seen[2]
        h = hashlib.blake2b(digest_size=20)
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self.known[name] = [stat.st_size, stat.st_mtime_ns, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self.known))
        os.replace(tmp, self.path)
        self.dirty = False


class ShardStore:
    """Entries named ``<key>`` or ``<key>.<field>`` spread over the shards of one directory."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, str] = {}  # key -> shard file
        self.fields: dict[str, list[str]] = {}  # key -> tensor names in its shard
        self.bad: dict[str, str] = {}  # key -> why it could not be made
        self._handles: dict[str, Any] = {}
        self._known: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        from safetensors import safe_open

        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            name = str(shard)
            if name in self._known:
                continue
            self._known.add(name)
            with safe_open(name, "pt") as f:
                meta = f.metadata() or {}
                for tensor in f.keys():
                    key = tensor.split(".", 1)[0]
                    self.where[key] = name
                    self.fields.setdefault(key, []).append(tensor)
            self.bad.update(json.loads(meta.get("bad", "{}")))

    def __contains__(self, key: str) -> bool:
        return key in self.where or key in self.bad

    def write(
        self, entries: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]], bad: Mapping[str, str]
    ) -> None:
        from diffcore.weights import save_safetensors

        tensors: dict[str, torch.Tensor] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().clone()
            else:
                for field, tensor in value.items():
                    tensors[f"{key}.{field}"] = tensor.detach().cpu().clone()
        path = self.folder / f"shard-{uuid.uuid4().hex}.safetensors"
        save_safetensors(tensors, path, metadata={"format": VERSION, "bad": json.dumps(dict(bad))})
        self._known.add(str(path))
        for name in tensors:
            key = name.split(".", 1)[0]
            self.where[key] = str(path)
            self.fields.setdefault(key, []).append(name)
        self.bad.update(bad)

    def read(self, key: str) -> torch.Tensor | dict[str, torch.Tensor]:
        from safetensors import safe_open

        shard = self.where[key]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(shard, "pt")
        names = self.fields[key]
        if names == [key]:
            return handle.get_tensor(key)
        return {name.split(".", 1)[1]: handle.get_tensor(name) for name in names}

    def __getstate__(self) -> dict[str, Any]:
        # Open shard handles do not cross into DataLoader worker processes; each opens its own.
        return {**self.__dict__, "_handles": {}}


class FeatureCache:
    """The cached encoder outputs for one dataset (see the module docstring)."""

    def __init__(self, dataset: Any, cache_dir: str | os.PathLike, encoder_id: str, *, text: bool = True):
        self.dataset = dataset
        self.dir = Path(cache_dir).expanduser()
        self.encoder_id = encoder_id
        resolve = getattr(dataset, "resolve", None)
        if resolve is None:
            raise UserError(f"{type(dataset).__name__} cannot be cached (it does not read images from files)")
        hashes = FileHashes(self.dir / "file-hashes.json")
        self._latent_key: dict[tuple[int, int, bool], str] = {}
        self._leaves: dict[int, Any] = {}
        self.todo: list[tuple[Any, int, bool]] = []  # (leaf dataset, index, flip) without a latent
        self.latents = ShardStore(self.dir / "latents")
        self.texts = ShardStore(self.dir / "text")
        captions: set[str] = set()
        self.text_cacheable = text
        seen: set[tuple[int, int]] = set()
        for i in range(len(dataset)):
            leaf, j, _ = resolve(i)
            if not hasattr(leaf, "placements"):
                raise UserError(
                    f"{type(leaf).__name__} examples cannot be cached (they are not image files)",
                    hint="remove cache_dir",
                )
            if (id(leaf), j) in seen:
                continue
            seen.add((id(leaf), j))
            self._leaves[id(leaf)] = leaf
            opts = leaf.options
            if opts.crop == "random":
                raise UserError(
                    "latents of randomly cropped images cannot be cached",
                    where=leaf.where + ".crop",
                    hint="use crop: center, or remove cache_dir",
                )
            content = hashes(leaf.records[j].image)
            placement = leaf.placements[j]
            for flip in (False, True) if opts.flip > 0 else (False,):
                key = _digest(
                    VERSION, "latent", content, placement.bucket, placement.resized, flip, encoder_id
                )
                self._latent_key[(id(leaf), j, flip)] = key
                if key not in self.latents:
                    self.todo.append((leaf, j, flip))
            if "captions" in leaf.fields:
                if opts.shuffle_tags:
                    self.text_cacheable = False
                captions.add(leaf.records[j].caption or "")
                if opts.caption_dropout > 0:
                    captions.add("")
        hashes.save()
        self.has_captions = bool(captions)
        self.captions = sorted(captions) if self.text_cacheable else []
        self.text_todo = [c for c in self.captions if self.text_key(c) not in self.texts]

    # -- what is there ---------------------------------------------------------------------------
    def text_key(self, caption: str) -> str:
        return _digest(VERSION, "text", caption, self.encoder_id)

    def latent_key(self, leaf: Any, index: int, flip: bool) -> str:
        return self._latent_key[(id(leaf), index, flip)]

    @property
    def needs_autoencoder(self) -> bool:
        return bool(self.todo)

    @property
    def needs_text_encoders(self) -> bool:
        return bool(self.text_todo) or (self.has_captions and not self.text_cacheable)

    @property
    def complete(self) -> bool:
        """Every latent and text-encoder output is on disk: train without the encoders."""
        return not self.needs_autoencoder and not self.needs_text_encoders

    def summary(self) -> str:
        latents = len(self._latent_key)
        texts = len(self.captions)
        line = f"latents: {latents - len(self.todo)}/{latents} cached"
        if self.has_captions:
            line += (
                f"; text: {texts - len(self.text_todo)}/{texts} cached"
                if self.text_cacheable
                else "; text: not cacheable (shuffle_tags)"
            )
        return line

    # -- filling it ------------------------------------------------------------------------------
    @torch.no_grad()
    def build(
        self, model: Any, *, batch_size: int = 8, shard_size: int = 256, progress: bool = False
    ) -> None:
        """Encode what is missing with ``model.encode_images`` / ``model.encode_conditions``."""
        device = getattr(model, "device", None)
        total = len(self.todo) + len(self.text_todo)
        bar = None
        if progress and total:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="caching", unit="example")
        try:
            self._build_latents(model, device, batch_size, shard_size, bar)
            self._build_text(model, batch_size, shard_size, bar)
        finally:
            if bar is not None:
                bar.close()

    def _build_latents(self, model: Any, device: Any, batch_size: int, shard_size: int, bar: Any) -> None:
        groups: dict[Any, list[tuple[Any, int, bool]]] = {}
        for leaf, j, flip in self.todo:
            groups.setdefault((id(leaf), leaf.placements[j].bucket), []).append((leaf, j, flip))
        pending: dict[str, torch.Tensor] = {}
        bad: dict[str, str] = {}
        done: list[tuple[Any, int, bool]] = []
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                batch, pixels = [], []
                for leaf, j, flip in members[start : start + batch_size]:
                    try:
                        pixels.append(self._pixels(leaf, j, flip))
                        batch.append((leaf, j, flip))
                    except Exception as exc:  # BadImage, and files gone since the scan
                        from diffcore.data.images import BadImage

                        if not isinstance(exc, (BadImage, OSError)):
                            raise
                        leaf._failed(j, str(exc))  # raises under on_bad_data: error
                        bad[self.latent_key(leaf, j, flip)] = str(exc)
                        done.append((leaf, j, flip))
                if pixels:
                    stacked = torch.stack(pixels)
                    if device is not None:
                        stacked = stacked.to(device)
                    latents = model.encode_images(stacked)
                    for (leaf, j, flip), latent in zip(batch, latents):
                        pending[self.latent_key(leaf, j, flip)] = latent
                        done.append((leaf, j, flip))
                if bar is not None:
                    bar.update(len(members[start : start + batch_size]))
                if len(pending) >= shard_size:
                    self.latents.write(pending, bad)
                    pending, bad = {}, {}
        if pending or bad:
            self.latents.write(pending, bad)
        finished = {(id(leaf), j, flip) for leaf, j, flip in done}
        self.todo = [t for t in self.todo if (id(t[0]), t[1], t[2]) not in finished]

    def _pixels(self, leaf: Any, index: int, flip: bool) -> torch.Tensor:
        placement = leaf.placements[index]
        slack = placement.slack
        return leaf.render(
            index, Draw(slack[0] // 2, slack[1] // 2, flip, None), pixels=True, only_pixels=True
        )["pixels"]

    def _build_text(self, model: Any, batch_size: int, shard_size: int, bar: Any) -> None:
        pending: dict[str, Any] = {}
        for start in range(0, len(self.text_todo), batch_size):
            chunk = self.text_todo[start : start + batch_size]
            cond = model.encode_conditions({"captions": list(chunk)})
            for n, caption in enumerate(chunk):
                pending[self.text_key(caption)] = _one(cond, n)
            if bar is not None:
                bar.update(len(chunk))
            if len(pending) >= shard_size:
                self.texts.write(pending, {})
                pending = {}
        if pending:
            self.texts.write(pending, {})
        self.text_todo = []

    # -- reading it ------------------------------------------------------------------------------
    def wrap(self, dataset: Any | None = None) -> CachedDataset:
        """The dataset reading latents (and text-encoder outputs) from this cache."""
        if self.needs_autoencoder:
            raise UserError(
                f"the latent cache is incomplete ({self.summary()})",
                where=str(self.dir),
                hint="run `diffcore cache JOB.yaml` first",
            )
        return CachedDataset(dataset if dataset is not None else self.dataset, self)


def _one(cond: Any, n: int) -> torch.Tensor | dict[str, torch.Tensor]:
    if isinstance(cond, torch.Tensor):
        return cond[n]
    if isinstance(cond, Mapping) and all(isinstance(v, torch.Tensor) for v in cond.values()):
        if any("." in k for k in cond):
            raise UserError("text-encoder outputs with '.' in their names cannot be cached")
        return {k: v[n] for k, v in cond.items()}
    raise UserError(
        f"encode_conditions returned {type(cond).__name__}; only a tensor or a dict of tensors can be cached",
        hint="turn the text cache off",
    )


class CachedDataset:
    """A dataset whose examples carry ``latents`` (and ``cond``) read from a :class:`FeatureCache`.

    The random choices (flip, caption dropout) are the same as the wrapped dataset's for the same
    (seed, epoch, index); an example whose image was found bad while caching is replaced by another
    of its bucket.
    """

    def __init__(self, dataset: Any, cache: FeatureCache):
        self.dataset = dataset
        self.cache = cache
        self.class_names = getattr(dataset, "class_names", None)
        self.text = cache.text_cacheable and cache.has_captions

    def __len__(self) -> int:
        return len(self.dataset)

    def bucket(self, index: int) -> Any:
        return self.dataset.bucket(index)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def problems(self) -> list[Any]:
        return self.dataset.problems

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch = getattr(index, "epoch", None)
        leaf, j, key = self.dataset.resolve(int(index))
        for candidate in leaf.same_bucket(j):
            choice = leaf.draw(candidate, key, epoch)
            latent_key = self.cache.latent_key(leaf, candidate, choice.flip)
            if latent_key in self.cache.latents.bad:
                continue
            out = leaf.render(candidate, choice, pixels=False)
            out["latents"] = self.cache.latents.read(latent_key)
            if self.text and "captions" in out:
                out["cond"] = self.cache.texts.read(self.cache.text_key(out["captions"]))
            return out
        raise UserError(f"no example of bucket {leaf.bucket(j)} could be loaded", where=leaf.where)
