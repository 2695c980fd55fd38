"""One training step of diffcore's Flux.2 transformer against diffusers' Flux2Transformer2DModel, for a
klein-shaped and a dev-shaped configuration in one run.

Forward + backward + AdamW step on the same configuration and the same weights (a random diffusers
checkpoint, loaded by both), the target image's tokens followed by one Kontext reference's (time id
10), the two models' steps interleaved so a busy machine slows both alike. Memory: the activations
autograd keeps for backward (on every device) and, on CUDA, the peak ``torch.cuda.max_memory_allocated``
growth of one step. Prints the figures and the ratios diffcore / diffusers (below 1.0 = diffcore better).

    python benchmarks/flux2_step.py                                  # CPU-sized default, both shapes
    python benchmarks/flux2_step.py --checkpointing
    python benchmarks/flux2_step.py --scale 1 --head-dim 128 --depth-scale 1 --latent 64 --txt-len 512 \\
        --batch 1 --device cuda --dtype bfloat16 --checkpointing      # the released sizes
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _step_harness import add_common_options, compare, report

#: (hidden, heads, double, single, text width) of the released models
SHAPES = {"klein": (3072, 24, 5, 20, 7680), "dev": (6144, 48, 8, 48, 15360)}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["klein", "dev"], choices=list(SHAPES))
    p.add_argument("--scale", type=int, default=6, help="divide the head count by this (text width alike)")
    p.add_argument("--head-dim", type=int, default=64, help="128 in the released models")
    p.add_argument("--depth-scale", type=int, default=4, help="divide block counts by this (at least 1)")
    p.add_argument("--latent", type=int, default=16, help="latent height = width (128 channels, one token each)")
    p.add_argument("--reference", type=int, default=8, help="side of one Kontext reference latent (0: none)")
    p.add_argument("--txt-len", type=int, default=64)
    add_common_options(p, steps=4)
    return p.parse_args()


def sizes(name: str, args: argparse.Namespace) -> dict:
    hidden, heads, double, single, text = SHAPES[name]
    heads = max(1, heads // args.scale)
    width = text * heads * args.head_dim // hidden  # the text keeps its ratio to the hidden size
    return dict(
        num_layers=max(1, double // args.depth_scale),
        num_single_layers=max(1, single // args.depth_scale),
        attention_head_dim=args.head_dim,
        num_attention_heads=heads,
        joint_attention_dim=width // 3 * 3,
        axes_dims_rope=(args.head_dim // 4,) * 4,
        guidance_embeds=name == "dev",
    )


def write_reference(config: dict, folder: Path) -> None:
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    Flux2Transformer2DModel(in_channels=128, **config).save_pretrained(folder)


def build(which: str, name: str, args: argparse.Namespace, folder: Path):
    """(module, step inputs -> output) for one side, on the benchmark's device and dtype."""
    dtype = getattr(torch, args.dtype)
    if which == "diffusers":
        from diffusers import Flux2Transformer2DModel

        module = Flux2Transformer2DModel.from_pretrained(folder).to(args.device, dtype)
        if args.checkpointing:
            module.enable_gradient_checkpointing()

        def forward(x):
            out = module(
                hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["t"], img_ids=x["img_ids"],
                txt_ids=x["txt_ids"], guidance=x["guidance"], return_dict=False,
            )[0]  # fmt: skip
            return out[:, : x["n"]]  # the pipelines keep the target's tokens

        return module, forward
    import diffcore

    variant = "dev" if name == "dev" else "klein-4b"
    model = diffcore.load_model("flux2", pretrained=folder, variant=variant, dtype=args.dtype)
    model.backbone.to(args.device)
    model.set_gradient_checkpointing(args.checkpointing)
    module = model.backbone

    def forward(x):
        return module(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["guidance"], keep=x["n"])

    return module, forward


def inputs(config: dict, args: argparse.Namespace) -> dict:
    from diffcore_flux.flux2.edit import flatten, grid_ids, reference_ids, text_ids

    g = torch.Generator().manual_seed(1)
    dtype, dev = getattr(torch, args.dtype), args.device
    b, side, ref = args.batch, args.latent, args.reference
    img, ids = flatten(torch.randn(b, 128, side, side, generator=g)), grid_ids(side, side)
    if ref:
        img = torch.cat((img, flatten(torch.randn(b, 128, ref, ref, generator=g))), dim=1)
        ids = torch.cat((ids, reference_ids([(ref, ref)])), dim=0)
    x = dict(
        img=img.to(dev, dtype),
        img_ids=ids.to(dev),
        txt=torch.randn(b, args.txt_len, config["joint_attention_dim"], generator=g).to(dev, dtype),
        txt_ids=text_ids(args.txt_len).to(dev),
        t=torch.rand(b, generator=g).to(dev, dtype),
        guidance=torch.ones(b).to(dev, dtype) if config["guidance_embeds"] else None,
        n=side * side,
    )
    x["target"] = torch.randn(b, side * side, 128, generator=g).to(dev, dtype)
    return x


def run(name: str, args: argparse.Namespace) -> None:
    config = sizes(name, args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        write_reference(config, folder)
        x = inputs(config, args)
        figures = compare({w: build(w, name, args, folder) for w in ("diffcore", "diffusers")}, x, args)
    hidden = config["attention_head_dim"] * config["num_attention_heads"]
    title = (
        f"flux2 {name}-shaped: hidden {hidden}, {config['num_layers']}+{config['num_single_layers']} blocks, "
        f"batch {args.batch}, {args.latent**2} target + {args.reference**2} reference + {args.txt_len} text tokens, "
        f"{args.dtype} on {args.device}"
    )
    report(title, figures, args, indent="  ")


def main() -> None:
    args = parse()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    for name in args.shapes:
        run(name, args)


if __name__ == "__main__":
    main()
