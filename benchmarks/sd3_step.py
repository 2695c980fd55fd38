"""One training step of diffcore's SD3 transformer against diffusers' SD3Transformer2DModel.

Forward + backward + AdamW step on the same configuration and the same weights (a random diffusers
checkpoint, loaded by both), the two models' steps interleaved in one run so a busy machine slows
both alike. The default is SD3.5-medium-shaped (MMDiT-X: dual attention in the first half of the
blocks, RMS q/k norm) at a CPU-sized width. Memory: the activations autograd keeps for backward (on
every device) and, on CUDA, the peak ``torch.cuda.max_memory_allocated`` growth of one step. Prints
the figures and the ratios diffcore / diffusers (below 1.0 = diffcore better); time as the median and
as the best step. On CPU a step's time is this process's CPU time (``time.process_time``; one thread
by default), so other work on a shared machine does not count; on CUDA it is wall time.

    python benchmarks/sd3_step.py                                 # CPU-sized SD3.5-medium shape
    python benchmarks/sd3_step.py --variant large --checkpointing
    python benchmarks/sd3_step.py --hidden 1536 --heads 24 --depth 24 --latent 128 --txt-len 333 \\
        --text-dim 4096 --pooled-dim 2048 --batch 1 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _step_harness import add_common_options, compare, report


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="medium", choices=["medium", "large"], help="medium: MMDiT-X")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--latent", type=int, default=32, help="latent height = width (16 channels, 2x2 patches)")
    p.add_argument("--txt-len", type=int, default=96, help="77 CLIP tokens + the T5 tokens")
    p.add_argument("--text-dim", type=int, default=256, help="T5 width (4096 for the real model)")
    p.add_argument("--pooled-dim", type=int, default=128, help="pooled CLIP-L + CLIP-G width (2048 real)")
    add_common_options(p, steps=8)
    return p.parse_args()


def write_reference(args: argparse.Namespace, folder: Path) -> None:
    from diffusers import SD3Transformer2DModel

    # SD3.5 medium has dual attention in 13 of 24 blocks: the same share here
    dual = tuple(range((args.depth * 13 + 23) // 24)) if args.variant == "medium" else ()
    torch.manual_seed(0)
    SD3Transformer2DModel(
        sample_size=args.latent,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=args.depth,
        attention_head_dim=args.hidden // args.heads,
        num_attention_heads=args.heads,
        joint_attention_dim=args.text_dim,
        caption_projection_dim=args.hidden,
        pooled_projection_dim=args.pooled_dim,
        pos_embed_max_size=max(args.latent // 2, 8),
        dual_attention_layers=dual,
        qk_norm="rms_norm",
    ).save_pretrained(folder)


def build(which: str, args: argparse.Namespace, folder: Path):
    """(module, step inputs -> output) for one side, on the benchmark's device and dtype."""
    dtype = getattr(torch, args.dtype)
    if which == "diffusers":
        from diffusers import SD3Transformer2DModel

        module = SD3Transformer2DModel.from_pretrained(folder).to(args.device, dtype)
        if args.checkpointing:
            module.enable_gradient_checkpointing()

        def forward(x):
            return module(
                hidden_states=x["x"],
                encoder_hidden_states=x["context"],
                pooled_projections=x["pooled"],
                timestep=x["t"] * 1000,
                return_dict=False,
            )[0]

        return module, forward
    import diffcore

    model = diffcore.load_model(
        "sd35", pretrained=folder, variant=args.variant, dtype=args.dtype, load_encoders=False
    )
    model.backbone.to(args.device)
    model.set_gradient_checkpointing(args.checkpointing)
    module = model.backbone

    def forward(x):
        return module(x["x"], x["t"], x["context"], x["pooled"])

    return module, forward


def inputs(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(1)
    dtype, dev = getattr(torch, args.dtype), args.device
    b, side = args.batch, args.latent
    return dict(
        x=torch.randn(b, 16, side, side, generator=g).to(dev, dtype),
        t=torch.rand(b, generator=g).to(dev, dtype),
        context=torch.randn(b, args.txt_len, args.text_dim, generator=g).to(dev, dtype),
        pooled=torch.randn(b, args.pooled_dim, generator=g).to(dev, dtype),
        target=torch.randn(b, 16, side, side, generator=g).to(dev, dtype),
    )


def main() -> None:
    args = parse()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        write_reference(args, folder)
        x = inputs(args)
        figures = compare({w: build(w, args, folder) for w in ("diffcore", "diffusers")}, x, args)
    tokens = (args.latent // 2) ** 2
    title = (
        f"sd3.5 {args.variant}: hidden {args.hidden}, {args.depth} blocks, batch {args.batch}, "
        f"{tokens} image + {args.txt_len} text tokens, {args.dtype} on {args.device}"
    )
    report(title, figures, args)


if __name__ == "__main__":
    main()
