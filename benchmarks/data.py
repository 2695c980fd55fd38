"""Data loading speed: loader throughput, and an epoch from cached latents against one that encodes
on the fly, measured in one run on the same images.

    python benchmarks/data.py [--images 96] [--resolution 128] [--batch-size 8] [--workers 0 2]
                              [--autoencoder sd-small|sd|conv] [--device cpu]

The autoencoder is diffcore-vae's "sd" family at random init (``sd-small``: narrower channels so a
CPU run ends in a minute; ``sd``: the published width), or a one-layer conv stand-in when the plugin
is not installed. Images are drawn at random sizes and aspect ratios into a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffcore.api import build_component
from diffcore.data.cache import FeatureCache
from diffcore.data.collate import collate
from diffcore.data.sampler import BucketBatchSampler


class ConvStandIn:
    """An 8x-downscaling conv 'autoencoder' for installs without diffcore-vae."""

    def __init__(self) -> None:
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels)


class Encoder:
    """The model side the cache needs: ``encode_images`` (and a device)."""

    def __init__(self, autoencoder: object, device: torch.device):
        self.autoencoder = autoencoder
        self.device = device

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(pixels.to(self.device))


def autoencoder(kind: str, device: torch.device) -> tuple[object, str]:
    if kind != "conv":
        try:
            import diffcore

            options = (
                {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1} if kind == "sd-small" else {}
            )
            ae = diffcore.load_autoencoder("sd", **options)
            ae.module.to(device) if hasattr(ae, "module") else ae.to(device)
            return ae, f"diffcore-vae sd family, random init ({'narrow' if options else 'published width'})"
        except Exception as exc:  # plugin not installed: fall back
            print(f"(diffcore-vae unavailable: {exc}; using the conv stand-in)")
    ae = ConvStandIn()
    ae.conv.to(device)
    return ae, "one-layer conv stand-in"


def draw_images(root: Path, count: int, resolution: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    aspects = [1.0, 1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16]
    for i in range(count):
        aspect = aspects[i % len(aspects)]
        scale = rng.uniform(1.0, 1.6)
        w, h = int(resolution * scale * aspect**0.5), int(resolution * scale / aspect**0.5)
        # smooth content so PNG decoding costs what a photo would, not noise
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(root / f"{i:05d}.png")
        (root / f"{i:05d}.txt").write_text(f"image {i}, tag a, tag b")


def epoch(dataset: object, batch_size: int, workers: int, model: Encoder | None = None) -> tuple[float, int]:
    """Seconds for one epoch (load, and encode when ``model`` is given) and the examples seen."""
    sampler = BucketBatchSampler(dataset, batch_size, seed=0, drop_last=False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_one_epoch(sampler), collate_fn=collate, num_workers=workers
    )
    seen = 0
    start = time.perf_counter()
    for batch in loader:
        if model is not None:
            latents = model.encode_images(batch["pixels"])
        else:
            latents = batch.get("latents", batch.get("pixels"))
        float(latents.float().sum())  # the work is done (and synchronised) before the clock stops
        seen += len(latents)
    return time.perf_counter() - start, seen


def _one_epoch(sampler: BucketBatchSampler) -> list[list[int]]:
    return [sampler.local(b) for b in sampler.epoch_batches(0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--autoencoder", choices=["sd-small", "sd", "conv"], default="sd-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        draw_images(root, args.images, args.resolution)
        options = {
            "path": str(root),
            "resolution": args.resolution,
            "bucket_step": 32,
            "cache_dir": str(Path(tmp) / "cache"),
        }
        t0 = time.perf_counter()
        dataset = build_component("dataset", "folder", options)
        scan = time.perf_counter() - t0
        buckets = len({dataset.bucket(i) for i in range(len(dataset))})
        print(
            f"{len(dataset)} images at resolution {args.resolution} in {buckets} buckets; start-up scan {scan:.2f} s"
        )
        print(f"torch threads: {torch.get_num_threads()}, device: {device}")

        for workers in args.workers:
            seconds, seen = epoch(dataset, args.batch_size, workers)
            print(
                f"loader throughput (decode, resize, crop; {workers} workers): {seen / seconds:8.1f} samples/s"
            )

        ae, name = autoencoder(args.autoencoder, device)
        model = Encoder(ae, device)
        print(f"autoencoder: {name}")
        model.encode_images(dataset[0]["pixels"][None])  # warm-up
        workers = args.workers[-1]
        live, seen = epoch(dataset, args.batch_size, workers, model)
        print(
            f"epoch encoding on the fly ({workers} workers):   {live:7.2f} s  ({seen / live:8.1f} samples/s)"
        )

        cache = FeatureCache(dataset, dataset.cache_dir, f"bench:{args.autoencoder}", text=False)
        t0 = time.perf_counter()
        cache.build(model, batch_size=args.batch_size)
        build = time.perf_counter() - t0
        print(f"cache build (once, reused by later runs):  {build:7.2f} s")
        t0 = time.perf_counter()
        cache = FeatureCache(dataset, dataset.cache_dir, f"bench:{args.autoencoder}", text=False)
        reopen = time.perf_counter() - t0
        assert not cache.needs_autoencoder
        cached, seen = epoch(cache.wrap(), args.batch_size, workers)
        print(
            f"epoch from cached latents ({workers} workers):  {cached:7.2f} s  ({seen / cached:8.1f} samples/s)"
        )
        print(f"cache reopen (hashes remembered): {reopen:.3f} s")
        print(f"speed-up of a cached epoch over encoding on the fly: {live / cached:.1f}x")


if __name__ == "__main__":
    main()
