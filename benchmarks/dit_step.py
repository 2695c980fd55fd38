"""One training step of diffcore's DiT against diffusers' DiTTransformer2DModel.

Forward + backward + AdamW step on the same configuration and the same weights, timed in one run with
the two models' steps interleaved (so a busy machine slows both alike), and the peak memory of a step:
``torch.cuda.max_memory_allocated`` on CUDA, the peak resident-set growth during a step in a fresh process per
model on CPU (with glibc returning large blocks at once). Prints the figures and the ratios diffcore / diffusers (below 1.0 = diffcore better).

    python benchmarks/dit_step.py                       # CPU-sized default: S/2 at 16x16 latents
    python benchmarks/dit_step.py --size XL/2 --input-size 32 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _step_harness import peak_bytes
from cpu_memory import peak_in_child, report_peak


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="S/2", help="DiT size preset (S/B/L/XL with patch 2/4/8)")
    p.add_argument(
        "--depth", type=int, default=None, help="override the preset's depth (keeps CPU runs short)"
    )
    p.add_argument("--input-size", type=int, default=16)
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--memory-only", choices=["diffcore", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    return p.parse_args()


def reference_weights(args: argparse.Namespace, folder: Path) -> None:
    """Random diffusers weights whose per-block embedders agree (as in every converted checkpoint)."""
    from diffcore_dit.config import parse_size
    from diffusers import DiTTransformer2DModel

    hidden, depth, heads, patch = parse_size(args.size)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=args.in_channels,
        num_layers=args.depth or depth,
        sample_size=args.input_size,
        patch_size=patch,
        num_embeds_ada_norm=args.num_classes,
    )
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    model.save_pretrained(folder)


def build(which: str, folder: Path, args: argparse.Namespace):
    """(module, step function) for one side; the step runs forward, backward and AdamW."""
    dtype = getattr(torch, args.dtype)
    if which == "diffcore":
        import diffcore

        model = diffcore.load_model("dit", pretrained=str(folder)).backbone

        def forward(x, t, y):
            return model(x, t, y)
    else:
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype)

        def forward(x, t, y):
            return model(x, timestep=t, class_labels=y).sample

    model.to(device=args.device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    side = args.input_size
    x = torch.randn(args.batch, args.in_channels, side, side, generator=g).to(args.device, dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=g).float().to(args.device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(args.device)
    target = torch.randn_like(x)

    def step() -> None:
        out = forward(x, t, y)
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(which: str, folder: Path, args: argparse.Namespace) -> int:
    """Peak extra memory of one steady-state training step (activations, gradients, optimizer
    temporaries) in bytes, over what the model and its optimizer state hold between steps."""
    if args.device.startswith("cuda"):
        _, step = build(which, folder, args)
        step()  # the optimizer state exists from here on, so it counts in the base
        return peak_bytes(step, args.device)
    # CPU: a fresh process per model; glibc is told to return every large block to the system, so the
    # resident set follows the live tensors, and the kernel's high-water mark is reset before the step
    return peak_in_child(["--memory-only", which, "--weights", str(folder)])


def cpu_memory_child(args: argparse.Namespace) -> None:
    _, step = build(args.memory_only, Path(args.weights), args)
    report_peak(step)


def main() -> None:
    args = parse()
    if args.memory_only:
        cpu_memory_child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dit"
        reference_weights(args, folder)
        sides = {name: build(name, folder, args) for name in ("diffcore", "diffusers")}
        params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in sides.items()}
        for _, step in sides.values():
            for _ in range(args.warmup):
                step()
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.steps):
            for name, (_, step) in sides.items():  # interleaved: load changes hit both sides
                sync(args.device)
                start = time.perf_counter()
                step()
                sync(args.device)
                times[name].append(time.perf_counter() - start)
        del sides
        memory = {name: peak_memory(name, folder, args) for name in ("diffcore", "diffusers")}

    print(
        f"DiT-{args.size} depth={args.depth or 'preset'} input={args.input_size} batch={args.batch} "
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}"
    )
    for name in ("diffcore", "diffusers"):
        print(
            f"  {name:9s} step {statistics.median(times[name]) * 1e3:9.1f} ms (median of {args.steps})  "
            f"peak memory {memory[name] / 2**20:8.1f} MiB  params {params[name] / 1e6:.2f} M"
        )
    time_ratio = statistics.median(times["diffcore"]) / statistics.median(times["diffusers"])
    mem_ratio = memory["diffcore"] / max(memory["diffusers"], 1)
    print(f"  ratio diffcore/diffusers: time {time_ratio:.3f}  peak memory {mem_ratio:.3f}")


if __name__ == "__main__":
    main()
