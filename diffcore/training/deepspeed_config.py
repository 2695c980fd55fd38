"""The DeepSpeed config a job implies."""

from __future__ import annotations

from typing import Any

from diffcore.config.job import Job, deep_merge


def loop_clips_gradients(job: Job) -> bool:
    """Whether the loop clips the gradients itself: in fp32 without ZeRO, DeepSpeed clips tensor by
    tensor and all-reduces the norm even in one process (a host round trip per step); with mixed
    precision or ZeRO its optimizer wrappers clip their flat buffers, and it keeps doing so."""
    train = job.train
    return bool(train.grad_clip) and train.mixed_precision == "no" and train.deepspeed.zero_stage == 0


def deepspeed_config(job: Job, world_size: int, *, load_universal: bool = False) -> dict[str, Any]:
    """``load_universal``: the engine will resume from a universal checkpoint (another world size)."""
    train = job.train
    ds = train.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if job.model.quantize != "none":
        # ZeRO-3 swaps F.linear for its own matmul, which torchao's quantised weights do not take
        zero["memory_efficient_linear"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "train_batch_size": train.batch_size * train.gradient_accumulation * world_size,
        # fp32 ZeRO-0: the loop clips with torch's foreach kernels (loop_clips_gradients)
        "gradient_clipping": 0.0 if loop_clips_gradients(job) else float(train.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "fp16": {"enabled": train.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # our own torch optimizers run under ZeRO (and on the CPU when offloaded)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return deep_merge(config, ds.extra)
