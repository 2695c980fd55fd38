"""SDXL-shaped UNet train step: diffcore's UNet against diffusers' UNet2DConditionModel.

Both get the same configuration and the same weights (diffusers builds them, diffcore loads its state
dict). A train step is forward, MSE loss, backward and an AdamW step. Each side runs in its own child
process (so peak memory is its own), alternating, ``--repeats`` times; the best median step time and
the peak memory are reported, with diffcore/diffusers ratios. A second timing steps both models
alternately in one process, which keeps the ratio honest on a shared or busy machine.

    python benchmarks/sdxl_step.py                       # CPU-sized SDXL shape
    python benchmarks/sdxl_step.py --preset full --device cuda --dtype bfloat16 --batch 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

from diffcore_sdxl.config import UNET_PRESETS

PRESETS = {
    # the SDXL layout (no attention at level 0, deeper transformers further down, text_time
    # embedding, 2048-wide context, 1280 pooled) at widths a CPU steps through in seconds
    "small": dict(
        block_out_channels=(64, 128, 256),
        attention=(False, True, True),
        transformer_layers=(1, 2, 2),
        heads=(1, 2, 4),
        cross_attention_dim=2048,
        linear_projection=True,
        addition_time_embed_dim=256,
        addition_input_dim=1280 + 6 * 256,
    ),
    "full": UNET_PRESETS["sdxl"],
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(side: str, args: argparse.Namespace):
    """(step function, device) for one side: model, AdamW and fixed random inputs."""
    import torch
    from diffcore_sdxl.config import UNetConfig
    from diffcore_sdxl.network import UNet
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = UNetConfig(**PRESETS[args.preset])
    # both sides build their module the same way and load the one weights file the parent wrote
    weights = load_file(args.weights)
    if side == "diffcore":
        model = UNet(cfg)
        model.gradient_checkpointing = args.checkpointing
    else:
        model = UNet2DConditionModel(**cfg.to_diffusers(sample_size=args.latent))
        if args.checkpointing:
            model.enable_gradient_checkpointing()
    model.load_state_dict(weights)
    del weights
    model.to(device, dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    g = torch.Generator().manual_seed(1)
    b, s = args.batch, args.latent
    x = torch.randn(b, 4, s, s, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    ctx = torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(b, cfg.pooled_dim, generator=g).to(device, dtype)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * b).to(device, dtype)
    target = torch.randn(b, 4, s, s, generator=g).to(device, dtype)

    def step() -> None:
        if side == "diffcore":
            out = model(x, t, ctx, pooled=pooled, time_ids=time_ids)
        else:
            out = model(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, device


def _worker(side: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    step, device = _setup(side, args)
    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # CPU: the child's peak resident set (the first warmup step already allocated optimizer state)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mib()
    queue.put({"side": side, "step_s": statistics.median(times), "peak_mib": peak})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--checkpointing", action="store_true", help="per-block activation checkpointing")
    args = parser.parse_args()

    import tempfile

    import torch
    from diffcore_sdxl.config import UNetConfig
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    tmp = tempfile.TemporaryDirectory()
    args.weights = f"{tmp.name}/unet.safetensors"
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**UNetConfig(**PRESETS[args.preset]).to_diffusers(sample_size=args.latent))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, args.weights)
    del ref

    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {"diffcore": [], "diffusers": []}
    for _ in range(args.repeats):
        for side in ("diffcore", "diffusers"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(side, args, queue))
            proc.start()
            results[side].append(queue.get())
            proc.join()
    best = {side: min(runs, key=lambda r: r["step_s"]) for side, runs in results.items()}
    peak = {side: min(r["peak_mib"] for r in runs) for side, runs in results.items()}
    ours, ref = best["diffcore"], best["diffusers"]
    # both sides in this process, stepping alternately: a shared or busy machine slows both alike
    steps = {side: _setup(side, args)[0] for side in ("diffcore", "diffusers")}
    times: dict[str, list[float]] = {"diffcore": [], "diffusers": []}
    cuda = args.device.startswith("cuda")
    for i in range(args.warmup + args.steps):
        for side, step in steps.items():
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[side].append(time.perf_counter() - start)
    inter = {side: statistics.median(t) for side, t in times.items()}
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "weights"},
        "diffcore_step_s": round(ours["step_s"], 4),
        "diffusers_step_s": round(ref["step_s"], 4),
        "time_ratio": round(ours["step_s"] / ref["step_s"], 3),
        "interleaved_diffcore_step_s": round(inter["diffcore"], 4),
        "interleaved_diffusers_step_s": round(inter["diffusers"], 4),
        "interleaved_time_ratio": round(inter["diffcore"] / inter["diffusers"], 3),
        "memory": "peak allocated above baseline"
        if args.device.startswith("cuda")
        else "peak RSS of the process",
        "diffcore_peak_mib": round(peak["diffcore"], 1),
        "diffusers_peak_mib": round(peak["diffusers"], 1),
        "memory_ratio": round(peak["diffcore"] / peak["diffusers"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
