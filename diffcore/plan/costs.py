"""Device memory and relative step time of one set of memory settings, from a job's inventory.

Every figure is bytes. The device holds the frozen weights (fewer with a quantised base, fewer with
block swap, plus the swap's prefetch buffer), the trained weights in the training dtype, the optimizer
state, DeepSpeed's fp32 master copy under mixed precision, and the step's live tensors (activations,
transients and gradients, measured on the meta device). ZeRO stages shard the optimizer state and
master copy (1), the gradients (2) and the trained weights (3) over the GPUs; offload moves the
optimizer state and master copy (and with stage 3 the weights) to host memory. The optimizer step
holds the gradients and its temporaries, which is the peak of a full finetune whose activations are
small.
"""

from __future__ import annotations

import attrs

from diffcore.plan.inventory import Inventory

#: bytes per quantised Linear weight (diffcore.quantize: int8 and fp8 one byte with a scale per output
#: row, NF4 half a byte plus one scale per 64 weights, themselves quantised)
QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.53}
#: bytes of optimizer state per trained parameter, fp32 states (adafactor: see below)
OPTIMIZER_BYTES = {
    "adamw": 8.0,  # exp_avg, exp_avg_sq
    "adamw8bit": 2.0,  # both moments in 8 bits (bitsandbytes; block scales are negligible)
    "prodigy": 16.0,  # exp_avg, exp_avg_sq, s and the initial weights p0
    "schedulefree_adamw": 8.0,  # z and exp_avg_sq (the weights hold y)
    "lion": 4.0,  # exp_avg
    "sgd": 0.0,  # 4 with momentum
}
#: what the loop holds with no model at all (DeepSpeed's engine, the process group, the data loader,
#: the callbacks): measured as a run of a 0.1 MB model's peak above the level before it (CPU, 24 MiB)
RUNTIME_BYTES = 24 * 2**20
#: device memory outside torch's allocator on CUDA (the context, its kernels' modules): kept free
#: when checking a fit, not part of the predicted peak (which matches max_memory_allocated)
CUDA_CONTEXT_BYTES = 2**29
MASTER_BYTES = 8.0
#: bytes per trained parameter of the optimizer step's temporaries (foreach kernels over the whole
#: parameter list; bitsandbytes and Adafactor work tensor by tensor; adamw only with foreach, see
#: Settings.adamw_foreach)
STEP_TEMP_BYTES = {
    "adamw": 4.0,
    "prodigy": 4.0,
    "schedulefree_adamw": 4.0,
    "lion": 4.0,
}  # DeepSpeed under bf16/fp16: fp32 weights and fp32 gradients of what trains
PRECISION_BYTES = {"bf16": 2, "fp16": 2}

# -- the basis of the relative step time ---------------------------------------------------------
#: sustained training throughput assumed when the job gives no train.peak_tflops (a 24 GB class card
#: in bf16 at about 40% of its peak)
DEFAULT_TFLOPS = 60.0
MFU = 0.4
#: host <-> device copies (PCIe 4.0 x16 in practice)
PCIE_BYTES_PER_S = 20e9
#: share of a swapped block's copy time that prefetching does not hide (waits at each block, copies
#: competing for memory bandwidth)
SWAP_UNHIDDEN = 0.2
#: the forward and backward through quantised Linear layers (dequantised per use), relative to bf16
QUANT_SLOWDOWN = {"none": 1.0, "fp8": 1.05, "int8": 1.10, "nf4": 1.25}
#: DeepSpeed's CPU optimizer: trained parameters updated per second
CPU_OPTIMIZER_PARAMS_PER_S = 1e9
ZERO3_SLOWDOWN = 1.15  # gathering the weights for every forward and backward


@attrs.frozen
class Settings:
    """The memory settings the planner chooses between."""

    blocks_to_swap: int = 0
    quantize: str = "none"
    checkpointing: bool = False
    optimizer: str = "adamw"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    #: the optimizer keeps momentum (sgd only)
    momentum: bool = False
    #: the built-in adamw runs torch's foreach kernels (``fused: false``), which hold a temporary per
    #: parameter across the whole list; its default fused kernel (CUDA and CPU) holds none
    adamw_foreach: bool = False


@attrs.frozen
class Estimate:
    settings: Settings
    frozen: int
    swap_buffer: int
    trained: int
    optimizer: int
    master: int
    activations: int
    #: host memory the settings add (offloaded state, swapped blocks)
    host: int
    step_s: float

    runtime: int = RUNTIME_BYTES

    @property
    def device(self) -> int:
        return (
            self.frozen
            + self.swap_buffer
            + self.trained
            + self.optimizer
            + self.master
            + self.activations
            + self.runtime
        )


def optimizer_bytes(inv: Inventory, s: Settings) -> float:
    if s.optimizer == "adafactor":
        # factored second moment: a row and a column vector per matrix, no first moment
        return 4.0 * inv.trainable.factored
    per = OPTIMIZER_BYTES.get(s.optimizer, 8.0)
    if s.optimizer == "sgd" and s.momentum:
        per = 4.0
    return per * inv.trainable.params


def frozen_bytes(inv: Inventory, quantize: str) -> int:
    """Frozen bytes on the device without swap."""
    total = 0.0
    for part in inv.frozen:
        size = float(part.bytes)
        if quantize != "none" and part.linear_params:
            size += part.linear_params * QUANT_BYTES[quantize] - part.linear_bytes
        total += size
    return int(total)


def estimate(
    inv: Inventory, s: Settings, *, gpus: int = 1, precision: str = "no", tflops: float | None = None
) -> Estimate:
    frozen = frozen_bytes(inv, s.quantize)
    # diffcore.training.block_swap keeps the last N blocks in host memory, all but their quantised
    # Linear weights, which stay on the device
    first = len(inv.block_frozen_bytes) - s.blocks_to_swap
    kept = inv.block_linear_bytes if s.quantize != "none" and inv.block_linear_bytes else [0] * inv.blocks
    swapped = [b - q for b, q in zip(inv.block_frozen_bytes[first:], kept[first:], strict=True)]
    # the block running and the next one, copied while it runs
    buffer = min(len(swapped), 2) * max(swapped, default=0)
    frozen -= sum(swapped)
    params = inv.trainable.params
    weight_bytes = PRECISION_BYTES.get(precision, inv.trainable.bytes / max(params, 1))
    trained = params * weight_bytes
    optimizer = optimizer_bytes(inv, s)
    master = MASTER_BYTES * params if precision in PRECISION_BYTES else 0.0
    activations = float(
        inv.activations.checkpointed
        if s.checkpointing and inv.activations.checkpointed is not None
        else inv.activations.plain
    )
    if s.zero_stage >= 1:
        optimizer /= gpus
        master /= gpus
    grads = float(inv.activations.grads)
    if s.zero_stage >= 2:
        activations -= grads * (1 - 1 / gpus)
        grads /= gpus
    # the optimizer step holds the gradients and its own temporaries (torch's foreach AdamW takes the
    # square root of every second moment at once: one fp32 value per parameter)
    per_param = 0.0 if s.optimizer == "adamw" and not s.adamw_foreach else STEP_TEMP_BYTES.get(s.optimizer, 0.0)
    step_temp = 0.0 if s.offload_optimizer else per_param * params
    if s.zero_stage >= 1:
        step_temp /= gpus
    activations = max(activations, grads + step_temp)
    if s.zero_stage == 3:
        trained /= gpus
    host = float(sum(swapped))
    if s.offload_optimizer:
        host += optimizer + master
        optimizer = master = 0.0
    if s.offload_params and s.zero_stage == 3:
        host += trained
        trained = 0.0
    return Estimate(
        settings=s,
        frozen=frozen,
        swap_buffer=buffer,
        trained=int(trained),
        optimizer=int(optimizer),
        master=int(master),
        activations=int(activations),
        host=int(host),
        step_s=step_seconds(inv, s, swapped=sum(swapped), gpus=gpus, tflops=tflops),
    )


def step_seconds(inv: Inventory, s: Settings, *, swapped: int, gpus: int, tflops: float | None) -> float:
    """A rough step time, for ranking settings (see the constants above for its basis)."""
    rate = (tflops * MFU if tflops else DEFAULT_TFLOPS) * 1e12
    passes = 4.0 if s.checkpointing else 3.0  # forward, backward (twice a forward), and the recompute
    compute = passes * inv.flops_per_sample * inv.batch_size / rate * QUANT_SLOWDOWN.get(s.quantize, 1.0)
    transfer = 2.0 * swapped / PCIE_BYTES_PER_S  # before the forward and again before the backward
    seconds = max(compute, transfer) + SWAP_UNHIDDEN * transfer
    if s.offload_optimizer:
        params = inv.trainable.params / (gpus if s.zero_stage >= 1 else 1)
        seconds += params / CPU_OPTIMIZER_PARAMS_PER_S + params * 8 / PCIE_BYTES_PER_S
    if s.zero_stage == 3:
        seconds *= ZERO3_SLOWDOWN
        if s.offload_params:
            seconds += 2 * inv.trainable.params * 2 / PCIE_BYTES_PER_S
    return seconds
