"""One training step of diffcore's Flux transformer against diffusers' FluxTransformer2DModel.

Forward + backward + AdamW step on the same configuration and the same weights (a random diffusers
checkpoint, loaded by both), with the two models' steps interleaved in one run so a busy machine
slows both alike. Memory: the activations autograd keeps for backward (on every device) and, on CUDA, the peak
``torch.cuda.max_memory_allocated`` growth of one step. Prints the figures and the
ratios diffcore / diffusers (below 1.0 = diffcore better).

    python benchmarks/flux_step.py                               # CPU-sized default (dev-shaped)
    python benchmarks/flux_step.py --variant schnell --checkpointing
    python benchmarks/flux_step.py --hidden 3072 --heads 24 --depth 19 --depth-single 38 \\
        --latent 64 --txt-len 512 --batch 1 --device cuda --dtype bfloat16 --checkpointing
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _step_harness import add_common_options, compare, report


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="dev", choices=["dev", "schnell"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--depth-single", type=int, default=4)
    p.add_argument("--latent", type=int, default=32, help="latent height = width (16 channels, packed 2x2)")
    p.add_argument("--txt-len", type=int, default=64)
    p.add_argument("--text-dim", type=int, default=256, help="T5 width (4096 for the real model)")
    p.add_argument("--pooled-dim", type=int, default=128, help="CLIP pooled width (768 for the real model)")
    add_common_options(p, steps=8)
    return p.parse_args()


def axes(head_dim: int) -> list[int]:
    """Flux's split of a head over (index, row, col): 16/56/56 of 128, scaled to ``head_dim``."""
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = (head_dim - first) // 2 // 2 * 2
    return [head_dim - 2 * rest, rest, rest]


def write_reference(args: argparse.Namespace, folder: Path) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        in_channels=64,
        num_layers=args.depth,
        num_single_layers=args.depth_single,
        attention_head_dim=args.hidden // args.heads,
        num_attention_heads=args.heads,
        joint_attention_dim=args.text_dim,
        pooled_projection_dim=args.pooled_dim,
        guidance_embeds=args.variant == "dev",
        axes_dims_rope=tuple(axes(args.hidden // args.heads)),
    )
    model.save_pretrained(folder)


def build(which: str, args: argparse.Namespace, folder: Path):
    """(module, step inputs -> output) for one side, on the benchmark's device and dtype."""
    dtype = getattr(torch, args.dtype)
    if which == "diffusers":
        from diffusers import FluxTransformer2DModel

        module = FluxTransformer2DModel.from_pretrained(folder).to(args.device, dtype)
        if args.checkpointing:
            module.enable_gradient_checkpointing()

        def forward(x):
            return module(
                hidden_states=x["img"],
                encoder_hidden_states=x["txt"],
                pooled_projections=x["y"],
                timestep=x["t"],
                img_ids=x["img_ids"],
                txt_ids=x["txt_ids"],
                guidance=x["guidance"],
                return_dict=False,
            )[0]

        return module, forward
    import diffcore

    model = diffcore.load_model("flux", pretrained=folder, variant=args.variant, dtype=args.dtype)
    model.backbone.to(args.device)
    model.set_gradient_checkpointing(args.checkpointing)
    module = model.backbone

    def forward(x):
        return module(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])

    return module, forward


def inputs(args: argparse.Namespace) -> dict:
    from diffcore_flux.packing import image_ids, pack, text_ids

    g = torch.Generator().manual_seed(1)
    dtype, dev = getattr(torch, args.dtype), args.device
    b, side = args.batch, args.latent
    latents = torch.randn(b, 16, side, side, generator=g)
    x = dict(
        img=pack(latents).to(dev, dtype),
        img_ids=image_ids(side, side).to(dev),
        txt=torch.randn(b, args.txt_len, args.text_dim, generator=g).to(dev, dtype),
        txt_ids=text_ids(args.txt_len).to(dev),
        t=torch.rand(b, generator=g).to(dev, dtype),
        y=torch.randn(b, args.pooled_dim, generator=g).to(dev, dtype),
        guidance=torch.ones(b).to(dev, dtype) if args.variant == "dev" else None,
    )
    x["target"] = torch.randn(x["img"].shape[:2] + (64,), generator=g).to(dev, dtype)
    return x


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
        f"flux {args.variant}: hidden {args.hidden}, {args.depth}+{args.depth_single} blocks, batch {args.batch}, "
        f"{tokens} image + {args.txt_len} text tokens, {args.dtype} on {args.device}"
    )
    report(title, figures, args)


if __name__ == "__main__":
    main()
