"""Steady-state step time of the diffcore loop against a bare PyTorch loop, in one run.

Both train the same model (a DiT-S/4 at 32x32 on the synthetic shapes, as the quickstart does, or the
example plugin's tiny model when diffcore-dit is not installed) with the same batch, objective and
AdamW. The bare loop is what a person would write by hand: a DataLoader, forward, MSE, backward,
clip, step. The figure is diffcore's time per step over the bare loop's (target at most 1.10).

    python benchmarks/loop_overhead.py [--steps 40] [--warmup 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def bare_loop(section: dict, batch_size: int, steps: int, warmup: int, lr: float) -> float:
    torch.manual_seed(0)
    options = {k: v for k, v in section.items() if k != "type"}
    model = diffcore.load_model(section["type"], **options)
    sched = diffcore.load_scheduler("ddpm", **{k: v for k, v in SCHED.items() if k != "type"})
    from diffcore.data.synthetic import build_synthetic
    from diffcore.data.synthetic_config import SyntheticConfig

    data = build_synthetic(SyntheticConfig(resolution=32, size=2048))
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=BucketBatchSampler(data, batch_size, seed=0), collate_fn=collate
    )
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    times = []
    it = iter(loader)
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(it)
        x0 = batch["pixels"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],)).float()
        pred = model.predict(sched.add_noise(x0, noise, t), t, model.encode_conditions(batch))
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def diffcore_loop(section: dict, batch_size: int, steps: int, warmup: int, lr: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        job = {
            "name": "bench",
            "output_dir": str(Path(tmp) / "out"),
            "model": section,
            "scheduler": SCHED,
            "data": {"type": "synthetic", "resolution": 32, "size": 2048},
            "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "checkpoint_every": 0},
            "callbacks": [{"type": "progress", "enabled": False}],
        }
        # the end-of-run checkpoint and export are not part of the steady state
        from diffcore.training import checkpoint as ckpt

        ckpt_save, export = ckpt.save_checkpoint, ckpt.export_weights
        ckpt.save_checkpoint = lambda ctx: None
        ckpt.export_weights = lambda ctx, folder: None
        try:
            run_job(structure_job(job))
        finally:
            ckpt.save_checkpoint, ckpt.export_weights = ckpt_save, export
        rows = [json.loads(x) for x in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    per_step = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return statistics.median(per_step[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    section = model_section()
    lr = 1e-4
    # bare, diffcore, bare again: the best bare figure guards against a noisy neighbour
    bare1 = bare_loop(section, args.batch_size, args.steps, args.warmup, lr)
    ours = diffcore_loop(section, args.batch_size, args.steps, args.warmup, lr)
    bare2 = bare_loop(section, args.batch_size, args.steps, args.warmup, lr)
    bare = min(bare1, bare2)
    print(f"loop_overhead: model {section['type']} batch {args.batch_size}, median of {args.steps - args.warmup} steps")
    print(f"  bare PyTorch loop  {bare * 1000:8.1f} ms/step")
    print(f"  diffcore loop      {ours * 1000:8.1f} ms/step")
    print(f"  ratio diffcore/bare {ours / bare:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
