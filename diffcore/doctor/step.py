"""One forward and backward at the job's largest bucket, measured: the step a run would take first,
without DeepSpeed or an optimizer, so it answers in seconds and shows what the activations cost."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcore.api import build_model
from diffcore.context import StepRandom, TrainContext
from diffcore.data.collate import collate
from diffcore.data.crops import buckets_of, image_datasets
from diffcore.errors import TrainingError, UserError
from diffcore.training.assemble import context_for, largest_example


@attrs.frozen
class StepFigures:
    bucket: tuple[int, int]
    batch_size: int
    precision: str
    device: str
    seconds: float
    loss: float
    #: bytes: CUDA max_memory_allocated during the step (weights included), or on the CPU how far the
    #: process's resident memory rose above its level before the step
    peak: int
    #: how ``peak`` was measured
    measured: str
    resident: int  # bytes allocated (CUDA) or resident (CPU) before the step
    trainable: int  # parameters the optimizer would update


@attrs.frozen
class CacheFigures:
    latents: int
    latent_bytes: int
    captions: int
    text_bytes: int
    seconds: float


def build(job: Any, dataset: Any) -> TrainContext:
    """The model, scheduler, method and adapter as the run builds them, on the job's device."""
    from diffcore.training.distributed import pick_device

    device = pick_device(job.train.device, 0)
    model = build_model(job.model.type, job.model.config, quantize=job.model.quantize, device=device,
                        mixed_precision=job.train.mixed_precision)  # fmt: skip
    model.to(device)
    if job.train.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    ctx = context_for(job, model, dataset, device)
    if not ctx.trainable:
        raise UserError("nothing to train: the method and adapter left no trainable parameters", where="$.method")
    return ctx


class ResidentPeak:
    """The highest resident set size of this process while the block runs, sampled every few
    milliseconds from /proc (the kernel's own peak, ru_maxrss, never falls, so a model load that
    peaked higher earlier would hide the step); where /proc is missing, the growth of ru_maxrss."""

    INTERVAL_S = 0.002

    def __init__(self) -> None:
        self.peak = 0
        self.before = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._statm = Path("/proc/self/statm")
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _now(self) -> int:
        return int(self._statm.read_text().split()[1]) * self._page

    def _watch(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self.peak = max(self.peak, self._now())

    def __enter__(self) -> ResidentPeak:
        if self._statm.is_file():
            self.before = self.peak = self._now()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        else:
            self.before = self.peak = _max_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._now())
        else:
            self.peak = _max_rss()

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.before)


def _max_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _precision(job: Any, device: torch.device) -> Any:
    """Activations in the job's mixed precision (autocast): they are what the peak is mostly made of.
    DeepSpeed also keeps the trained weights in that dtype, which autocast does not, so on a large
    model the run's own peak is somewhat lower than this one."""
    import contextlib

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if job.train.mixed_precision not in dtypes:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[job.train.mixed_precision])


def measure_step(ctx: TrainContext, index: int) -> StepFigures:
    """Loss, backward and their peak memory for a batch of ``train.batch_size`` at example ``index``."""
    job = ctx.job
    batch = collate([ctx.dataset[index]] * job.train.batch_size)
    bucket = buckets_of(ctx.dataset)[index]
    ctx.step_random = StepRandom(job.seed, 0)
    ctx.model.backbone.train()
    cuda = ctx.device.type == "cuda"
    rss = ResidentPeak()
    if cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
    start = time.perf_counter()
    where = f"bucket {bucket[1]}x{bucket[0]}, batch {job.train.batch_size}"
    try:
        with rss, _precision(job, ctx.device):
            loss, _ = ctx.method.loss(ctx, batch)
            loss.backward()
            if cuda:
                torch.cuda.synchronize(ctx.device)
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of memory in one forward and backward at {where}: lower train.batch_size, turn on "
            "train.gradient_checkpointing, or lower data.resolution"
        ) from None
    except (UserError, TrainingError):
        raise
    except Exception as exc:  # what the run's first step would die of, said before it starts
        raise TrainingError(f"the first train step fails at {where}: {type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - start
    value = float(loss.detach().float())
    if not torch.isfinite(torch.tensor(value)):
        raise TrainingError(f"the first step's loss is {value} at bucket {bucket[1]}x{bucket[0]}: check the data and the model's dtype")
    if cuda:
        peak, measured = torch.cuda.max_memory_allocated(ctx.device), "CUDA max_memory_allocated"
    else:
        peak, measured, before = rss.growth, "the process's resident memory above its level before the step", rss.before
    for p in ctx.trainable:
        p.grad = None
    return StepFigures(
        bucket=bucket,
        batch_size=job.train.batch_size,
        precision=job.train.mixed_precision,
        device=str(ctx.device),
        seconds=seconds,
        loss=value,
        peak=peak,
        measured=measured,
        resident=before,
        trainable=sum(p.numel() for p in ctx.trainable),
    )


@torch.no_grad()
def estimate_cache(ctx: TrainContext, report: Any) -> CacheFigures:
    """Size and time of filling ``data.cache_dir`` from nothing, scaled from one encoded example at
    the largest bucket (latent size and encoding time grow with the pixel count)."""
    dataset = ctx.dataset
    index = largest_example(dataset)
    example = dataset[index]
    pixels = example["pixels"][None].to(ctx.device)
    start = time.perf_counter()
    latent = ctx.model.encode_images(pixels)
    latent_s = time.perf_counter() - start
    area = pixels.shape[-2] * pixels.shape[-1]
    per_pixel = latent.numel() * latent.element_size() / area
    seconds_per_pixel = latent_s / area
    leaves = image_datasets(dataset) or []
    flips = 2 if any(leaf.options.flip > 0 for leaf in leaves) else 1
    areas = [f.bucket[0] * f.bucket[1] for f in report.fits] or [area] * len(dataset)
    latents = len(areas) * flips
    latent_bytes = int(sum(a * per_pixel for a in areas) * flips)
    seconds = sum(a * seconds_per_pixel for a in areas) * flips
    captions = sorted({str(r.caption or "") for leaf in leaves for r in leaf.records})
    text_bytes = 0
    if captions and "captions" in example:
        start = time.perf_counter()
        try:
            cond = ctx.model.encode_conditions({"captions": [captions[0]]})
        except Exception:  # a model that conditions on more than text: its text is not cached alone
            return CacheFigures(latents, latent_bytes, 0, 0, seconds)
        text_s = time.perf_counter() - start
        tensors = [cond] if isinstance(cond, torch.Tensor) else [v for v in cond.values() if isinstance(v, torch.Tensor)]
        text_bytes = sum(t.numel() * t.element_size() for t in tensors) * len(captions)
        seconds += text_s * len(captions)
    else:
        captions = []
    return CacheFigures(latents, latent_bytes, len(captions), text_bytes, seconds)
