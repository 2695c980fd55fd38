"""Steady-state step time of the diffcore loop against a bare PyTorch loop, in one run.

Both train the same model (a DiT-S/4 at 32x32 on the synthetic shapes, as the quickstart does, or the
example plugin's tiny model when diffcore-dit is not installed) with the same batch, objective and
AdamW. The bare loop is what a person would write by hand: a DataLoader, forward, MSE, backward,
clip, step, and no host synchronisation in a step (no ``.item()``): the device runs ahead of Python
in both loops. Both are timed over the same steps after the warm-up, from one device sync to
another: the bare loop end to end, diffcore's between the ``elapsed_s`` of its logged steps (it logs
every ``--warmup`` steps, reading its losses back only then). The figure is diffcore's time per step
over the bare loop's (target at most 1.03); each loop runs ``--repeats`` times, alternating, and the
best of each counts (a shared machine only ever slows a run down).

The clock: wall time on CUDA; on a CPU, by default, this process's CPU time (one thread: the work
done, which neighbours on a shared machine do not stretch as they stretch wall time; the data
loading runs in the process, num_workers 0). ``--clock wall`` measures wall time on a CPU too.

    python benchmarks/loop_overhead.py [--steps 40] [--warmup 8] [--repeats 2] [--device cpu|cuda] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import diffcore  # noqa: E402
from diffcore.config.job import structure_job  # noqa: E402
from diffcore.data.collate import collate  # noqa: E402
from diffcore.data.sampler import BucketBatchSampler  # noqa: E402
from diffcore.registry import get_registry  # noqa: E402
from diffcore.training import run_job  # noqa: E402


def model_section() -> dict:
    if "dit" in get_registry().names("model"):
        return {"type": "dit", "size": "S/4", "input_size": 32, "in_channels": 3, "num_classes": 4}
    return {"type": "example-tiny", "width": 64, "num_classes": 4}


SCHED = {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


#: the clock both loops are timed with (set in main)
CLOCK = time.perf_counter


class _LoopClock:
    """Stands in for the ``time`` module inside diffcore's loop, whose logged ``elapsed_s`` then
    follow :data:`CLOCK` (the run's start time cancels out of the differences taken here)."""

    def __getattr__(self, name: str):
        return CLOCK if name == "time" else getattr(time, name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(section: dict, batch_size: int, steps: int, warmup: int, lr: float, device: torch.device) -> float:
    torch.manual_seed(0)
    options = {k: v for k, v in section.items() if k != "type"}
    model = diffcore.load_model(section["type"], **options)
    model.to(device)
    sched = diffcore.load_scheduler("ddpm", **{k: v for k, v in SCHED.items() if k != "type"})
    from diffcore.data.synthetic import build_synthetic
    from diffcore.data.synthetic_config import SyntheticConfig

    data = build_synthetic(SyntheticConfig(resolution=32, size=2048))
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=BucketBatchSampler(data, batch_size, seed=0), collate_fn=collate
    )
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    # the kernels diffcore's built-in adamw picks: fused on CUDA and CPU
    kernels = {"fused": True}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, **kernels)
    it = iter(loader)
    start = 0.0
    for step in range(steps):
        if step == warmup:
            _sync(device)
            start = CLOCK()
        batch = next(it)
        x0 = batch["pixels"].to(device, non_blocking=True)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],), device=device).float()
        labels = batch["labels"].to(device, non_blocking=True)  # what encode_conditions would return
        pred = model.predict(sched.add_noise(x0, noise, t), t, labels)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # returns the norm as a tensor: no sync
        opt.step()
    _sync(device)
    return (CLOCK() - start) / (steps - warmup)


def diffcore_loop(section: dict, batch_size: int, steps: int, warmup: int, lr: float, device: torch.device) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        job = {
            "name": "bench",
            "output_dir": str(Path(tmp) / "out"),
            "model": section,
            "scheduler": SCHED,
            "data": {"type": "synthetic", "resolution": 32, "size": 2048},
            "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "checkpoint_every": 0, "log_every": warmup,
                      "device": device.type},  # fmt: skip
            "callbacks": [{"type": "progress", "enabled": False}],
        }
        # the end-of-run checkpoint and export are not part of the steady state
        from diffcore.training import checkpoint as ckpt
        from diffcore.training import loop

        ckpt_save, export, loop_time = ckpt.save_checkpoint, ckpt.export_weights, loop.time
        ckpt.save_checkpoint = lambda ctx: None
        ckpt.export_weights = lambda ctx, folder: None
        loop.time = _LoopClock()  # type: ignore[assignment]
        try:
            run_job(structure_job(job))
        finally:
            ckpt.save_checkpoint, ckpt.export_weights, loop.time = ckpt_save, export, loop_time
        rows = [json.loads(x) for x in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    # a logged step's elapsed_s is taken after its losses were read back: a device sync
    first, last = next(r for r in rows if r["step"] == warmup), rows[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None, help="default: cpu on a CPU, wall on CUDA")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (diffcore logs every --warmup steps)")
    device = torch.device(args.device)
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    global CLOCK
    CLOCK = time.process_time if clock == "cpu" else time.perf_counter
    section = model_section()
    lr = 1e-4
    bare, ours = [], []
    for _ in range(args.repeats):  # alternating, so that a noisy neighbour hits both alike
        bare.append(bare_loop(section, args.batch_size, args.steps, args.warmup, lr, device))
        print(f"  (bare {bare[-1] * 1000:.1f} ms/step)", flush=True)
        ours.append(diffcore_loop(section, args.batch_size, args.steps, args.warmup, lr, device))
        print(f"  (diffcore {ours[-1] * 1000:.1f} ms/step)", flush=True)
    measured = args.steps - args.warmup
    print(f"loop_overhead: model {section['type']} batch {args.batch_size} on {device.type}, {measured} steps after "
          f"{args.warmup} warm-up, best of {args.repeats}, {clock} time")  # fmt: skip
    print(f"  bare PyTorch loop  {min(bare) * 1000:8.1f} ms/step  (runs: {', '.join(f'{b * 1000:.1f}' for b in bare)})")
    print(f"  diffcore loop      {min(ours) * 1000:8.1f} ms/step  (runs: {', '.join(f'{o * 1000:.1f}' for o in ours)})")
    print(f"  ratio diffcore/bare {min(ours) / min(bare):.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
