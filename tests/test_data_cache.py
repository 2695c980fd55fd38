"""Latent and text caches: exact values, reuse across runs and jobs, invalidation, `diffcore cache`."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

import diffcore
from diffcore.api import build_component
from diffcore.data.cache import FeatureCache
from diffcore.data.sampler import EpochIndex
from diffcore.errors import UserError
from diffcore.model import DiffusionModel


def draw_image(path: Path, width: int, height: int, seed: int = 0, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, fmt)
    return path


class StandIn(DiffusionModel):
    """A model with an 8x conv 'autoencoder' and a deterministic 'text encoder' that count their calls."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        super().__init__(self.conv, latent_channels=4)
        self.images = 0
        self.texts = 0

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += len(pixels)
        return self.conv(pixels)

    def encode_conditions(self, batch: dict) -> dict:
        self.texts += len(batch["captions"])
        codes = torch.tensor([[float(sum(map(ord, c)) % 97), float(len(c))] for c in batch["captions"]])
        return {"hidden": codes[:, None, :].repeat(1, 3, 1), "pooled": codes}


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    for i, (w, h) in enumerate([(64, 64), (70, 66), (128, 64), (64, 128), (96, 48), (48, 96)]):
        draw_image(root / f"{i}.png", w, h, seed=i)
        (root / f"{i}.txt").write_text(f"caption {i}")
    return root


def folder(path: Path, cache: Path, **options) -> object:
    base = {"path": str(path), "resolution": 64, "bucket_step": 16, "min_side": 32, "cache_dir": str(cache)}
    return build_component("dataset", "folder", {**base, **options})


def test_cached_examples_equal_encoding_on_the_fly(images, tmp_path):
    ds = folder(images, tmp_path / "cache", flip=0.5, caption_dropout=0.3)
    model = StandIn()
    cache = FeatureCache(ds, ds.cache_dir, "standin-v1")
    assert cache.needs_autoencoder and cache.needs_text_encoders and not cache.complete
    cache.build(model, batch_size=4)
    assert cache.complete
    assert model.images == 2 * len(ds)  # plain and flipped
    assert model.texts == len(ds) + 1  # every caption and the empty one (dropout)
    cached = cache.wrap()
    flips = drops = 0
    for epoch in range(3):
        for i in range(len(ds)):
            index = EpochIndex(i, epoch)
            live, hit = ds[index], cached[index]
            assert "pixels" not in hit and hit["captions"] == live["captions"]
            torch.testing.assert_close(hit["latents"], model.encode_images(live["pixels"][None])[0])
            cond = model.encode_conditions({"captions": [live["captions"]]})
            torch.testing.assert_close(hit["cond"], {k: v[0] for k, v in cond.items()})
            flips += ds.draw(i, epoch=epoch).flip
            drops += live["captions"] == ""
    assert flips > 0 and drops > 0  # both variants were exercised


def test_training_from_a_full_cache_needs_no_encoders(images, tmp_path):
    ds = folder(images, tmp_path / "cache")
    FeatureCache(ds, ds.cache_dir, "standin-v1").build(StandIn())
    # a later run: a fresh dataset and cache, no model at all
    ds2 = folder(images, tmp_path / "cache")
    cache = FeatureCache(ds2, ds2.cache_dir, "standin-v1")
    assert cache.complete and not cache.needs_autoencoder and not cache.needs_text_encoders
    from diffcore.data.collate import collate
    from diffcore.data.sampler import BucketBatchSampler

    cached = cache.wrap()
    for batch in BucketBatchSampler(cached, 1, seed=0).epoch_batches(0):
        out = collate([cached[i] for i in batch])
        assert out["latents"].shape[1] == 4 and set(out["cond"]) == {"hidden", "pooled"}


def test_only_what_changed_is_rebuilt(images, tmp_path):
    cache_dir = tmp_path / "cache"
    ds = folder(images, cache_dir)
    FeatureCache(ds, cache_dir, "enc-a").build(StandIn())
    shards = set((cache_dir / "latents").glob("shard-*"))

    draw_image(images / "2.png", 128, 64, seed=1234)  # new content, same name and size
    (images / "4.txt").write_text("a new caption")
    ds = folder(images, cache_dir)
    cache = FeatureCache(ds, cache_dir, "enc-a")
    assert [str(leaf.records[j].image.name) for leaf, j, _ in cache.todo] == ["2.png"]
    assert cache.text_todo == ["a new caption"]
    model = StandIn()
    cache.build(model)
    assert (model.images, model.texts) == (1, 1)
    assert shards < set((cache_dir / "latents").glob("shard-*"))  # old shards kept, one added

    # another encoder, or another geometry, makes its own entries
    assert len(FeatureCache(ds, cache_dir, "enc-b").todo) == len(ds)
    other_res = folder(images, cache_dir, resolution=48)
    assert len(FeatureCache(other_res, cache_dir, "enc-a").todo) == len(other_res)


def test_a_second_job_reuses_the_cache(images, tmp_path):
    cache_dir = tmp_path / "cache"
    ds = folder(images, cache_dir)
    FeatureCache(ds, cache_dir, "enc").build(StandIn())
    rows = [{"image": str(images / f"{i}.png"), "caption": f"caption {i}"} for i in range(6)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = build_component(
        "dataset",
        "metadata",
        {"file": str(tmp_path / "metadata.jsonl"), "resolution": 64, "bucket_step": 16, "min_side": 32},
    )
    assert FeatureCache(meta, cache_dir, "enc").complete


def test_mix_is_cached_through_its_leaves(images, tmp_path):
    base = {"type": "folder", "path": str(images), "resolution": 64, "bucket_step": 16, "min_side": 32}
    mix = build_component(
        "dataset",
        "mix",
        {"datasets": [{**base, "repeats": 2}, {**base, "flip": 1.0}], "cache_dir": str(tmp_path / "c")},
    )
    model = StandIn()
    cache = FeatureCache(mix, mix.cache_dir, "enc")
    cache.build(model)
    assert model.images == 6 + 12  # the repeated copies share entries; the flipping one adds flips
    cached = cache.wrap()
    for i in range(len(mix)):
        torch.testing.assert_close(cached[i]["latents"], model.encode_images(mix[i]["pixels"][None])[0])


def test_what_cannot_be_cached(images, tmp_path):
    with pytest.raises(UserError, match="randomly cropped"):
        FeatureCache(folder(images, tmp_path / "c", crop="random"), tmp_path / "c", "enc")
    ds = folder(images, tmp_path / "c", shuffle_tags=True)
    cache = FeatureCache(ds, ds.cache_dir, "enc")
    cache.build(StandIn())
    assert not cache.needs_autoencoder and cache.needs_text_encoders  # tags change every epoch
    example = cache.wrap()[0]
    assert "latents" in example and "cond" not in example and "captions" in example
    with pytest.raises(UserError, match="incomplete.*diffcore cache"):
        FeatureCache(ds, ds.cache_dir, "other-encoder").wrap()


def test_a_file_that_fails_while_caching_is_skipped(images, tmp_path):
    jpeg = draw_image(images / "9.jpg", 64, 64, fmt="JPEG")
    (images / "9.txt").write_text("broken")
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])  # passes the header check
    ds = folder(images, tmp_path / "cache")
    assert len(ds) == 7
    cache = FeatureCache(ds, ds.cache_dir, "enc")
    cache.build(StandIn())
    assert cache.complete and [p.path for p in ds.problems] == [str(jpeg)]
    cached = FeatureCache(folder(images, tmp_path / "cache"), ds.cache_dir, "enc")
    assert cached.complete  # the failure is remembered, not retried every run
    bad = [p.image.name for p in ds.records].index("9.jpg")
    example = cached.wrap()[bad]  # a stand-in from the same bucket
    assert example["latents"].shape == (4, 8, 8) and example["captions"] != "broken"


@attrs.define
class StandInConfig:
    seed: int = 0


class StandInPlugin:
    @diffcore.hookimpl
    def diffcore_register_models(self):
        return [diffcore.ModelSpec(name="standin", config=StandInConfig, factory=lambda c: StandIn(c.seed))]


def test_cache_command(images, tmp_path, capsys):
    from diffcore.cli import main
    from diffcore.registry import PluginInfo, build_registry, set_registry

    registry = build_registry(autoload=False)
    registry.register(StandInPlugin(), PluginInfo(name="standin", distribution="test", version="0"))
    set_registry(registry)
    job = tmp_path / "job.yaml"
    cache_dir = tmp_path / "cache"
    job.write_text(
        f"model: {{type: standin}}\n"
        f"data: {{type: folder, path: {images}, resolution: 64, bucket_step: 16, min_side: 32, cache_dir: {cache_dir}}}\n"
    )
    assert main(["cache", str(job), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (
        "latents: 0/6 cached; text: 0/6 cached" in out
        and "done; latents: 6/6 cached; text: 6/6 cached" in out
    )
    assert main(["cache", str(job), "--no-progress"]) == 0
    assert "latents: 6/6 cached" in capsys.readouterr().out.splitlines()[0]
    # another model config is another encoder
    assert main(["cache", str(job), "--no-progress", "--set", "model.seed=1"]) == 0
    assert "latents: 0/6 cached" in capsys.readouterr().out
    job.write_text(
        f"model: {{type: standin}}\ndata: {{type: folder, path: {images}, resolution: 64, min_side: 32}}\n"
    )
    assert main(["cache", str(job)]) == 2
    assert "cache_dir" in capsys.readouterr().err


def test_image_sizes_are_remembered_between_runs(images, tmp_path, monkeypatch):
    import diffcore.data.sizes as sizes

    calls = []
    real = sizes.probe
    monkeypatch.setattr(
        sizes, "probe", lambda path, decode: calls.append(path.name) or real(path, decode=decode)
    )
    first = folder(images, tmp_path / "cache")
    assert len(calls) == 6
    calls.clear()
    draw_image(images / "3.png", 32, 128, seed=7)  # changed: checked again, and its new shape is used
    second = folder(images, tmp_path / "cache")
    assert calls == ["3.png"]
    assert [p.resized for p in second.placements] != [p.resized for p in first.placements]
    calls.clear()
    folder(images, tmp_path / "cache", scan="decode")  # a deeper check than the remembered one
    assert len(calls) == 6
