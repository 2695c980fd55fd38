"""Throughput figures for every logged step: tokens/s, achieved TFLOP/s, MFU and peak memory.

Nothing here reads a device tensor: the loop tells :class:`Throughput` each micro-batch's shape (a
tuple the collated batch already holds on the host), and the figures are worked out from those
counts only at logged steps. Training FLOPs follow one convention (docs/speed.md): the backbone's
forward FLOPs (``DiffusionModel.flops_per_sample``) times 3 when the backbone's own weights train
(forward, input gradients, weight gradients) and times 2 when they are frozen (adapters, a method's
side network: no weight gradients for the base). Recomputation under activation checkpointing is
never counted, so the MFU of a checkpointed run is the useful fraction of the hardware's peak.
"""

from __future__ import annotations

import re
import resource
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch

#: dense (no structured sparsity) peak TFLOP/s by precision, from the vendors' data sheets; the first
#: pattern matching ``torch.cuda.get_device_name`` wins, so the more specific names come first.
#: GeForce cards are listed at their fp32-accumulate tensor rate, the one training uses.
PEAK_TFLOPS: tuple[tuple[str, str, Mapping[str, float]], ...] = (
    (r"\bH100\b.*\bNVL\b", "H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bGH200\b", "GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bA100\b", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL40S\b", "L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", "L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"RTX 6000 Ada", "RTX 6000 Ada", {"bf16": 364.2, "fp16": 364.2, "tf32": 182.1, "fp32": 91.1}),
    (r"RTX A6000", "RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"RTX 4090", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", "RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bV100\b", "V100", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
)


def device_peak(device_name: str, precision: str) -> float | None:
    """The table's dense peak TFLOP/s for ``device_name`` (as torch names it) at ``precision``
    (``bf16``, ``fp16``, ``tf32`` or ``fp32``); None when the device or precision is not listed."""
    for pattern, _, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(precision)
    return None


def compute_precision(mixed_precision: str, weights: torch.dtype, tf32: bool, device: torch.device) -> str:
    """The precision the backbone's matmuls run in: the mixed precision, else the weights' own half
    dtype (a bf16 base with mixed_precision "no"), else TF32 where it is on (CUDA), else fp32."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    if weights == torch.bfloat16:
        return "bf16"
    if weights == torch.float16:
        return "fp16"
    return "tf32" if tf32 and device.type == "cuda" else "fp32"


def peak_memory_mib(device: torch.device) -> float:
    """The most memory this process has held: CUDA's peak allocation on ``device``, else the peak
    resident set (what the kernel reports for the process; no device sync either way)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def latent_shape(batch: Mapping[str, Any], channels: int, downscale: int) -> tuple[int, tuple[int, ...]] | None:
    """The samples in a collated batch and (C, H, W) of one sample's latents as the backbone sees
    them, from the batch's tensor shapes (host metadata: nothing is read from a device); None for a
    batch with neither ``latents`` nor ``pixels``."""
    if "latents" in batch:
        latents = batch["latents"].shape
        return int(latents[0]), tuple(int(d) for d in latents[1:])
    if "pixels" not in batch:
        return None
    pixels = batch["pixels"].shape
    return int(pixels[0]), (channels, int(pixels[-2]) // downscale, int(pixels[-1]) // downscale)


def backbone_trains(backbone: torch.nn.Module, adapter_params: Iterable[torch.nn.Parameter] | None) -> bool:
    """Whether any of the backbone's own weights train (a full finetune), adapter branches aside."""
    adapter = {id(p) for p in adapter_params or ()}
    return any(p.requires_grad and id(p) not in adapter for p in backbone.parameters())


@attrs.define
class Throughput:
    """Counts what the loop processed since the last logged step and turns it into figures.

    ``model`` has ``sequence_length(latents)`` and ``flops_per_sample(latents)`` (the model
    contract); ``passes`` is 3 for a full finetune, 2 with the backbone frozen; ``peak`` is the
    device's dense TFLOP/s (None: no MFU); ``world_size`` scales this rank's counts to the run's
    (every rank draws same-shaped micro-batches)."""

    model: Any
    passes: int
    peak: float | None
    world_size: int = 1
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    #: the model's latent channels and pixels per latent (read once: the loop counts every micro-batch)
    channels: int = attrs.field(default=attrs.Factory(lambda self: self.model.latent_channels, takes_self=True))
    downscale: int = attrs.field(default=attrs.Factory(lambda self: self.model.latent_downscale, takes_self=True))
    _shapes: dict[tuple[int, ...], int] = attrs.field(factory=dict)
    #: a batch of this window had no latents or pixels to count: no token or FLOP figures
    _blind: bool = False
    _per_shape: dict[tuple[int, ...], tuple[int, float | None]] = attrs.field(factory=dict)

    def count(self, batch: Mapping[str, Any]) -> None:
        """One micro-batch this rank trains on (a collated batch with ``pixels`` or ``latents``)."""
        counted = latent_shape(batch, self.channels, self.downscale)
        if counted is None:
            self._blind = True
            return
        samples, shape = counted
        self._shapes[shape] = self._shapes.get(shape, 0) + samples

    def figures(self, seconds: float) -> dict[str, float]:
        """``tokens_per_sec``, ``tflops``, ``mfu`` (when the peak is known and the model counts its
        FLOPs) and ``peak_mem_mib`` over the ``seconds`` since the last call; starts a new window."""
        tokens, flops = 0.0, 0.0
        known = True
        for shape, samples in self._shapes.items():
            seq, forward = self._shape_figures(shape)
            tokens += seq * samples
            if forward is None:
                known = False
            else:
                flops += forward * self.passes * samples
        blind, self._shapes, self._blind = self._blind, {}, False
        seconds = max(seconds, 1e-9)
        out = {} if blind else {"tokens_per_sec": tokens * self.world_size / seconds}
        if known and flops and not blind:
            tflops = flops * self.world_size / seconds / 1e12
            out["tflops"] = tflops
            if self.peak is not None:
                out["mfu"] = tflops / (self.peak * self.world_size)
        out["peak_mem_mib"] = peak_memory_mib(self.device)
        return out

    def _shape_figures(self, shape: tuple[int, ...]) -> tuple[int, float | None]:
        if shape not in self._per_shape:
            # the models read only the shape: a meta tensor allocates nothing
            latents = torch.empty((1, *shape), device="meta")
            self._per_shape[shape] = (int(self.model.sequence_length(latents)), self.model.flops_per_sample(latents))
        return self._per_shape[shape]


def for_run(ctx: Any) -> Throughput:
    """The counter for a training run: passes from whether the backbone's weights train, the peak
    from ``train.peak_tflops`` or the table (CUDA only)."""
    train = ctx.job.train
    model = ctx.model
    passes = 3 if backbone_trains(model.backbone, ctx.adapter_params) else 2
    peak = train.peak_tflops
    if peak is None and ctx.device.type == "cuda":
        precision = compute_precision(train.mixed_precision, model.dtype, train.tf32, ctx.device)
        peak = device_peak(torch.cuda.get_device_name(ctx.device), precision)
    return Throughput(model=model, passes=passes, peak=peak, world_size=ctx.world_size, device=ctx.device)
