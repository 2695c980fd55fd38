"""ControlNet training step: diffcore's ``controlnet`` method against the default ``diffusion`` method on
the same model (time), and against diffusers' ``train_controlnet`` step shape (time and peak memory).

The model is an SD1.5-shaped UNet (random weights, latents and text states given). diffcore's steps
are the method's ``loss`` (noise, ControlNet, frozen UNet with its residuals, regression), backward
and AdamW over what trains, set up as the loop does (``diffcore.testing.fake_context``); the default
method finetunes the whole UNet. diffusers' step is examples/controlnet/train_controlnet.py's:
``ControlNetModel.from_unet``, the ControlNet's down/mid residuals into the frozen
``UNet2DConditionModel``, MSE on the noise, AdamW over the ControlNet. Each side runs in its own
child process, alternating, ``--repeats`` times (peak memory is its own); the best median step time,
the peak memory and the ratios are printed. The time ratios come from a second timing that steps the
three sides alternately in one process, which keeps them honest on a shared or busy machine.

    python benchmarks/controlnet_step.py                 # CPU-sized
    python benchmarks/controlnet_step.py --device cuda --preset sd15 --latent 64 --batch 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # the SD1.5 layout (attention on all but the last level, 8 heads, conv projections) at CPU widths
    "small": dict(
        block_out_channels=(32, 64, 128, 128),
        attention=(True, True, True, False),
        transformer_layers=(1, 1, 1, 1),
        heads=(8, 8, 8, 8),
        cross_attention_dim=256,
        norm_groups=16,
    ),
    "sd15": {},
}
SIDES = ("diffusion", "controlnet", "diffusers")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(args: argparse.Namespace) -> Any:
    import diffcore

    return diffcore.load_model(
        "sd15", unet=PRESETS[args.preset], load_encoders=False, autoencoder=False, resolution=args.latent * 8
    )


def _unet_config(args: argparse.Namespace) -> Any:
    # the config alone: building diffcore's UNet in the diffusers child would raise its peak memory
    from diffcore_sdxl.config import UNET_PRESETS, UNetConfig

    return UNetConfig(**{**UNET_PRESETS["sd15"], **PRESETS[args.preset]})


def _inputs(args: argparse.Namespace, cross: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    b, s = args.batch, args.latent
    return {
        "latents": torch.randn(b, 4, s, s, generator=g),
        "context": torch.randn(b, 77, cross, generator=g),
        "control": torch.rand(b, 3, s * 8, s * 8, generator=g) * 2 - 1,
        "noise": torch.randn(b, 4, s, s, generator=g),
        "t": torch.randint(0, 1000, (b,), generator=g),
    }


def _diffcore_step(side: str, args: argparse.Namespace):
    import torch

    from diffcore.context import StepRandom
    from diffcore.testing import fake_context

    model = _model(args)
    model.backbone.load_state_dict(torch.load(args.weights, weights_only=True))
    model.to(args.device)
    if side == "controlnet":
        from diffcore_controlnet.config import ControlNetConfig
        from diffcore_controlnet.method import ControlNetMethod

        method: Any = ControlNetMethod(ControlNetConfig())
    else:
        from diffcore.methods.config import DiffusionMethodConfig
        from diffcore.methods.diffusion import DiffusionMethod

        method = DiffusionMethod(DiffusionMethodConfig())
    ctx = fake_context(model, method=method)
    ctx.device = torch.device(args.device)
    for module in ctx.method_modules.values():
        module.to(args.device)
    opt = torch.optim.AdamW(ctx.trainable, lr=1e-5)
    x = _inputs(args, model.unet_config.cross_attention_dim)
    batch = {"latents": x["latents"], "cond": {"context": x["context"]}, "control": x["control"]}
    state = {"step": 0}

    def step() -> None:
        ctx.step_random = StepRandom(0, state["step"])
        state["step"] += 1
        loss, _ = method.loss(ctx, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _diffusers_step(args: argparse.Namespace):
    import torch
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(**_unet_config(args).to_diffusers(sample_size=args.latent))
    unet.load_state_dict(torch.load(args.weights, weights_only=True))
    controlnet = ControlNetModel.from_unet(unet)
    unet.requires_grad_(False)
    unet.to(args.device)
    controlnet.to(args.device).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x = {k: v.to(args.device) for k, v in _inputs(args, unet.config.cross_attention_dim).items()}
    control = (x["control"] + 1) / 2

    def step() -> None:
        noisy = scheduler.add_noise(x["latents"], x["noise"], x["t"])
        down, mid = controlnet(noisy, x["t"], x["context"], controlnet_cond=control, return_dict=False)
        pred = unet(
            noisy, x["t"], x["context"], down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        loss = torch.nn.functional.mse_loss(pred.float(), x["noise"].float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _worker(side: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import diffusers  # noqa: F401  (every child imports it, so the CPU peaks share one baseline)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    step = _diffusers_step(args) if side == "diffusers" else _diffcore_step(side, args)
    cuda = args.device.startswith("cuda")
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib()
    queue.put({"side": side, "step_s": statistics.median(times), "peak_mib": peak})


def _alternating(args: argparse.Namespace) -> dict[str, float]:
    """Median step time of each side, the three stepping in turn in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {side: _diffusers_step(args) if side == "diffusers" else _diffcore_step(side, args) for side in SIDES}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for i in range(args.warmup + args.steps):
        for side, step in steps.items():
            start = time.perf_counter()
            step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[side].append(time.perf_counter() - start)
    return {side: statistics.median(v) for side, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--latent", type=int, default=16, help="latent side (the control image is 8x)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        # one set of UNet weights (diffusers names, which diffcore's UNet shares) for every side
        args.weights = str(Path(tmp) / "unet.pt")
        torch.save(_model(args).backbone.state_dict(), args.weights)
        results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        ctx = mp.get_context("spawn")
        for _ in range(args.repeats):
            for side in SIDES:
                queue: mp.Queue = ctx.Queue()
                proc = ctx.Process(target=_worker, args=(side, args, queue))
                proc.start()
                results[side].append(queue.get())
                proc.join()
        alternating = _alternating(args)
    best = {side: min(r["step_s"] for r in rows) for side, rows in results.items()}
    peak = {side: min(r["peak_mib"] for r in rows) for side, rows in results.items()}
    report = {
        "shape": {"preset": args.preset, "latent": args.latent, "batch": args.batch, "device": args.device},
        "step_ms_own_process": {side: round(v * 1000, 1) for side, v in best.items()},
        "step_ms_alternating": {side: round(v * 1000, 1) for side, v in alternating.items()},
        "peak_mib": {side: round(v, 1) for side, v in peak.items()},
        "time_controlnet_vs_default": round(alternating["controlnet"] / alternating["diffusion"], 2),
        "time_controlnet_vs_diffusers": round(alternating["controlnet"] / alternating["diffusers"], 2),
        "memory_controlnet_vs_diffusers": round(peak["controlnet"] / peak["diffusers"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
