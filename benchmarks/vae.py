"""Autoencoder encode and decode: diffcore-vae against diffusers on the same configuration and weights.

The published architecture of a family (random weights, written once as a diffusers folder and loaded
by both sides) encodes images and decodes latents; times are interleaved between the two sides so a
busy machine slows both alike. Peak memory of one call: ``torch.cuda.max_memory_allocated`` growth on
CUDA; on CPU the resident-set high-water mark growth during the call, in a fresh process per side and
operation (glibc told to return large blocks at once, the kernel's high-water mark reset first).
Both sides run under ``torch.no_grad()`` and include the family's latent scaling (Flux.2: patchify and
batch-norm statistics, as Flux2Pipeline does). Prints figures and ratios diffcore / diffusers (below 1.0
= diffcore better).

    python benchmarks/vae.py                          # SDXL VAE, 256x256, CPU-sized
    python benchmarks/vae.py --family flux2 --size 1024 --batch 4 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cpu_memory import peak_in_child, report_peak

OPS = ("encode", "decode")
SIDES = ("diffcore", "diffusers")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sdxl", choices=["sd", "sdxl", "sd3", "flux", "flux2"])
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--memory-only", help=argparse.SUPPRESS)  # "side:op" in a child process
    p.add_argument("--weights", help=argparse.SUPPRESS)
    return p.parse_args()


def reference_weights(args: argparse.Namespace, folder: Path) -> None:
    """The family's published architecture at random init, as a diffusers vae/ folder."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    import diffcore

    cfg = diffcore.get_registry().get("autoencoder", args.family).spec.config()
    n = len(cfg.block_out_channels)
    common = dict(
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
    )
    torch.manual_seed(0)
    if args.family == "flux2":
        vae = AutoencoderKLFlux2(**common)
        vae.bn.running_mean.normal_(0, 0.3)
        vae.bn.running_var.uniform_(0.5, 1.5)
    else:
        vae = AutoencoderKL(**common, scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)
    vae.save_pretrained(folder)


def build(side: str, folder: Path, args: argparse.Namespace):
    """{op: callable} for one side, and the inputs they take."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(1)
    pixels = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(args.device, dtype)
    if side == "diffcore":
        import diffcore

        ae = diffcore.load_autoencoder(args.family, str(folder), dtype=args.dtype).to(args.device)
        latents = torch.randn(ae.encode(pixels[:1]).shape[1:], generator=g).to(args.device, dtype)
        latents = latents.expand(args.batch, *latents.shape).contiguous()
        return {"encode": lambda: ae.encode(pixels), "decode": lambda: ae.decode(latents)}, latents
    from diffusers import AutoencoderKL, AutoencoderKLFlux2
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    flux2 = args.family == "flux2"
    vae = (AutoencoderKLFlux2 if flux2 else AutoencoderKL).from_pretrained(str(folder), torch_dtype=dtype)
    vae.to(args.device).eval()
    if flux2:
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)

        def encode():
            return (Flux2Pipeline._patchify_latents(vae.encode(pixels).latent_dist.mode()) - mean) / std

        def decode(z):
            return vae.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample
    else:
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

        def encode():
            return (vae.encode(pixels).latent_dist.mode() - shift) * scale

        def decode(z):
            return vae.decode(z / scale + shift).sample

    return {"encode": encode, "decode": lambda: decode(LATENTS[0])}, None


LATENTS: list[torch.Tensor] = []  # the diffusers side decodes the same latents as the diffcore side


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _sides(folder: Path, args: argparse.Namespace) -> dict:
    ours, latents = build("diffcore", folder, args)
    LATENTS[:] = [latents]
    theirs, _ = build("diffusers", folder, args)
    return {"diffcore": ours, "diffusers": theirs}


def peak_memory(side: str, op: str, folder: Path, args: argparse.Namespace) -> int:
    """Peak memory of one call in bytes, over what is held before it (weights, inputs)."""
    if args.device.startswith("cuda"):
        fn = _sides(folder, args)[side][op]
        with torch.no_grad():
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return peak_in_child(["--memory-only", f"{side}:{op}", "--weights", str(folder)])


def cpu_memory_child(args: argparse.Namespace) -> None:
    side, op = args.memory_only.split(":")
    fn = _sides(Path(args.weights), args)[side][op]
    with torch.no_grad():
        report_peak(fn)


def main() -> None:
    args = parse()
    if args.memory_only:
        cpu_memory_child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "vae"
        reference_weights(args, folder)
        sides = _sides(folder, args)
        times = {(s, op): [] for s in SIDES for op in OPS}
        with torch.no_grad():
            for fns in sides.values():
                for op in OPS:
                    for _ in range(args.warmup):
                        fns[op]()
            for _ in range(args.repeats):
                for op in OPS:
                    for side in SIDES:  # interleaved: load changes hit both sides
                        sync(args.device)
                        start = time.perf_counter()
                        sides[side][op]()
                        sync(args.device)
                        times[side, op].append(time.perf_counter() - start)
        del sides
        memory = {(s, op): peak_memory(s, op, folder, args) for s in SIDES for op in OPS}

    print(
        f"VAE {args.family} {args.size}x{args.size} batch={args.batch} device={args.device} dtype={args.dtype} "
        f"threads={torch.get_num_threads()}"
    )
    for op in OPS:
        for side in SIDES:
            t = statistics.median(times[side, op])
            print(
                f"  {op:6s} {side:9s} {t * 1e3:9.1f} ms (median of {args.repeats})  "
                f"peak memory {memory[side, op] / 2**20:8.1f} MiB"
            )
        t_ratio = statistics.median(times["diffcore", op]) / statistics.median(times["diffusers", op])
        m_ratio = memory["diffcore", op] / max(memory["diffusers", op], 1)
        print(f"  {op:6s} ratio diffcore/diffusers: time {t_ratio:.3f}  peak memory {m_ratio:.3f}")


if __name__ == "__main__":
    main()
