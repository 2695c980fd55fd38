"""The reflow pair cache: (noise, sample) pairs of a teacher on disk, in safetensors shards.

``manifest.json`` holds what made the pairs (the spec: teacher, sampler, steps, guidance, size,
seed, count, shard size); shard s (``pairs-<s>.safetensors``: ``noise``, ``sample``, ``labels``
and/or the captions in its header) holds pairs s * shard_size onwards and is written atomically
when complete, so its presence is its completeness: an interrupted generation resumes at the first
missing shard, and ranks split the shards (s mod world_size) without coordinating beyond a barrier.
A cache that differs only in its pair count is adopted: the shards the two counts share are kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.errors import UserError
from diffcore.weights import save_safetensors

MANIFEST = "manifest.json"
FORMAT = 1

#: pairs [start, stop) -> {"noise", "sample", optional "labels"} tensors and optional captions
MakeShard = Callable[[int, int], tuple[dict[str, torch.Tensor], list[str] | None]]


@attrs.frozen
class Pairs:
    """Every pair of a complete cache, in memory."""

    noise: torch.Tensor
    sample: torch.Tensor
    labels: torch.Tensor | None
    captions: list[str] | None

    def __len__(self) -> int:
        return self.noise.shape[0]


class PairCache:
    def __init__(self, folder: str | Path, spec: Mapping[str, Any], where: str = "$.method.cache_dir"):
        self.folder = Path(folder)
        self.spec = dict(spec)
        self.where = where
        self.count = int(self.spec["pairs"])
        self.shard_size = int(self.spec["shard_size"])

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_path(self, s: int) -> Path:
        return self.folder / f"pairs-{s:05d}.safetensors"

    def bounds(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min((s + 1) * self.shard_size, self.count)

    def range_tag(self, s: int) -> str:
        """Shard s's pairs as its header records them ("start:stop")."""
        return "{}:{}".format(*self.bounds(s))

    def prepare(self, write: bool) -> None:
        """Check an existing manifest against the spec (a mismatch is a UserError: those pairs came
        from other settings; another pair count alone is adopted by the main rank, see
        :meth:`resize`), or write it (``write``: the main rank)."""
        path = self.folder / MANIFEST
        if path.is_file():
            found = json.loads(path.read_text()).get("spec") or {}
            changed = sorted(k for k in set(found) | set(self.spec) if found.get(k) != self.spec.get(k))
            if changed == ["pairs"]:
                # pair i depends on the seed and i alone, so another count keeps the shards it shares
                if write:
                    self.resize()
                return
            if changed:
                raise UserError(
                    f"the reflow pair cache {self.folder} was generated with other settings ({', '.join(changed)})",
                    where=self.where,
                    hint="delete that folder to generate anew, or set method.cache_dir to another folder",
                )
            return
        if write:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.write_manifest()

    def write_manifest(self) -> None:
        path = self.folder / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "spec": self.spec, "shards": self.shards}, indent=2))
        tmp.replace(path)

    def resize(self) -> None:
        """Adopt a cache made for another pair count: a shard whose pairs are not exactly this count's
        shard of the same number is deleted (made again by :meth:`fill`), before the manifest is
        rewritten, so an interruption between the two leaves a cache that either count can resume."""
        from safetensors import safe_open

        for shard in sorted(self.folder.glob("pairs-*.safetensors")):
            s = int(shard.stem.split("-")[1])
            with safe_open(str(shard), framework="pt") as f:
                recorded = (f.metadata() or {}).get("diffcore_distill.pairs")
            if s >= self.shards or recorded != self.range_tag(s):
                shard.unlink()
        self.write_manifest()

    def missing(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's shards not yet on disk."""
        return [s for s in range(rank, self.shards, world_size) if not self.shard_path(s).is_file()]

    def fill(self, make: MakeShard, rank: int = 0, world_size: int = 1, progress: bool = False) -> int:
        """Generate this rank's missing shards with ``make``; returns how many were made."""
        todo = self.missing(rank, world_size)
        for n, s in enumerate(todo):
            start, stop = self.bounds(s)
            tensors, captions = make(start, stop)
            meta = {"diffcore_distill.pairs": self.range_tag(s)}
            if captions is not None:
                meta["captions"] = json.dumps(captions)
            save_safetensors(tensors, self.shard_path(s), metadata=meta)
            if progress:
                print(f"diffcore-distill: reflow pairs: shard {n + 1}/{len(todo)} ({stop} of {self.count})", flush=True)
        return len(todo)

    def load(self) -> Pairs:
        """Every pair (all shards must be present)."""
        from safetensors import safe_open

        absent = self.missing()
        if absent:
            raise UserError(
                f"the reflow pair cache {self.folder} lacks {len(absent)} shard(s), first {self.shard_path(absent[0]).name}",
                where=self.where,
                hint="run the job again (or with --resume) to generate them",
            )
        noise, sample, labels, captions = [], [], [], []
        for s in range(self.shards):
            with safe_open(str(self.shard_path(s)), framework="pt") as f:
                meta = f.metadata() or {}
                noise.append(f.get_tensor("noise"))
                sample.append(f.get_tensor("sample"))
                if "labels" in f.keys():
                    labels.append(f.get_tensor("labels"))
                if "captions" in meta:
                    captions.extend(json.loads(meta["captions"]))
        return Pairs(
            torch.cat(noise),
            torch.cat(sample),
            torch.cat(labels) if labels else None,
            captions if captions else None,
        )
