"""Compiled train steps: diffcore eager and compiled (``train.compile: blocks``) beside diffusers eager
and compiled (``compile_repeated_blocks``), for DiT-B/4, an SDXL-shaped UNet and a Flux-shaped
transformer, in one process.

Each architecture's four sides hold the same random weights (diffusers builds them, diffcore loads
them) and take forward, MSE loss, backward and an AdamW step on the same batch. A compiled side's
first step compiles: its time less the median step is the compile time. The steps then alternate
over the four sides (a busy machine slows them alike) and the median of each is reported (on a CPU
this process's CPU time, so other work on a shared machine does not count; on CUDA wall time), with
diffcore compiled / diffusers eager (target <= 0.8) and diffcore compiled / diffusers compiled
(target <= 1.0), and the graph breaks dynamo took while compiling each side (target 0 in the blocks).
Inductor's on-disk caches go to a fresh folder, so compile times are cold unless ``--warm-cache``.
``--optimizer own`` (the default) gives each side its trainer's AdamW: diffcore's built-in ``adamw``
(fused) on the diffcore sides, torch's defaults (what the diffusers scripts build) on the diffusers
sides; ``--optimizer same`` torch's defaults on all four, so only the model and its compilation differ.

    python benchmarks/compile_step.py                          # CPU (inductor), a few minutes
    python benchmarks/compile_step.py --only dit --steps 20
    python benchmarks/compile_step.py --compile full            # whole backbones on both
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ARCHES = ("dit", "sdxl", "flux")
SIDES = ("diffcore eager", "diffcore compiled", "diffusers eager", "diffusers compiled")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only", choices=ARCHES, action="append", help="one architecture (repeatable; default all)"
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after the compiling one")
    p.add_argument(
        "--compile", default="blocks", choices=["blocks", "full"],
        help="blocks: train.compile blocks / compile_repeated_blocks; full: train.compile full / torch.compile of the whole model",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps shared machines steady)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--optimizer", default="own", choices=["own", "same"],
        help="own: each trainer's AdamW (diffcore's built-in, torch's defaults for diffusers); same: torch's defaults on all",
    )  # fmt: skip
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's default on-disk cache")
    p.add_argument("--dit-depth", type=int, default=2, help="DiT-B/4 blocks (12 in the published size)")
    p.add_argument("--dit-input", type=int, default=32, help="DiT latent side (8x8 tokens at /4)")
    p.add_argument("--dit-batch", type=int, default=4)
    p.add_argument("--sdxl-latent", type=int, default=32)
    p.add_argument("--sdxl-batch", type=int, default=2)
    p.add_argument("--flux-latent", type=int, default=32, help="latent side (16 channels, packed 2x2)")
    p.add_argument("--flux-batch", type=int, default=2)
    return p.parse_args()


class Side:
    """One side of a comparison: a module, its forward on the fixed batch, and a train step."""

    def __init__(self, name: str, module: Any, forward: Callable[[], Any], target: Any, optimizer: str):
        from _step_harness import optimizer as build_optimizer

        self.module = module.train()
        self.forward = forward
        self.target = target
        self.optimizer = build_optimizer(name.split()[0], module, optimizer)
        self.times: list[float] = []
        self.compile_s = 0.0
        self.graph_breaks = 0
        self.first_loss = 0.0
        #: what compile_backbone reads (diffcore sides)
        self.model: Any = None

    def step(self) -> float:
        import torch

        loss = torch.nn.functional.mse_loss(self.forward().float(), self.target.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class _Blocks:
    """What ``compile_backbone`` reads of a model, for a bare backbone built here."""

    def __init__(self, backbone: Any, paths: list[str]):
        self.backbone = backbone
        self.paths = paths

    def repeated_blocks(self) -> list[str]:
        return self.paths


def dit_sides(args: argparse.Namespace, folder: Path) -> dict[str, Side]:
    import torch
    from diffusers import DiTTransformer2DModel
    from dit_step import reference_weights

    import diffcore

    ns = argparse.Namespace(
        size="B/4", depth=args.dit_depth, input_size=args.dit_input, in_channels=4, num_classes=1000
    )
    reference_weights(ns, folder)
    g = torch.Generator().manual_seed(1)
    b, s = args.dit_batch, args.dit_input
    x = torch.randn(b, 4, s, s, generator=g).to(args.device)
    t = torch.randint(0, 1000, (b,), generator=g).float().to(args.device)
    y = torch.randint(0, 1000, (b,), generator=g).to(args.device)
    target = torch.randn(b, 4, s, s, generator=g).to(args.device)
    sides = {}
    for name in SIDES:
        if name.startswith("diffcore"):
            model = diffcore.load_model("dit", pretrained=str(folder))
            module = model.backbone.to(args.device)
            sides[name] = Side(name, module, lambda m=module: m(x, t, y), target, args.optimizer)
            sides[name].model = model
        else:
            module = DiTTransformer2DModel.from_pretrained(str(folder)).to(args.device)
            # the DiT class names no repeated blocks; its blocks are BasicTransformerBlock, as in the UNet
            module._repeated_blocks = ["BasicTransformerBlock"]
            sides[name] = Side(
                name, module, lambda m=module: m(x, timestep=t, class_labels=y).sample, target, args.optimizer
            )
    return sides


def sdxl_sides(args: argparse.Namespace, folder: Path) -> dict[str, Side]:
    import torch
    from diffcore_sdxl.config import SDXLConfig, UNetConfig
    from diffcore_sdxl.model import SDModel
    from diffcore_sdxl.network import UNet
    from diffusers import UNet2DConditionModel
    from sdxl_step import PRESETS

    cfg = UNetConfig(**PRESETS["small"])
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**cfg.to_diffusers(sample_size=args.sdxl_latent))
    weights = {k: v.clone() for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    b, s = args.sdxl_batch, args.sdxl_latent
    x = torch.randn(b, 4, s, s, generator=g).to(args.device)
    t = torch.randint(0, 1000, (b,), generator=g).to(args.device)
    ctx = torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(args.device)
    pooled = torch.randn(b, cfg.pooled_dim, generator=g).to(args.device)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * b).to(args.device)
    target = torch.randn(b, 4, s, s, generator=g).to(args.device)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    sides = {}
    for name in SIDES:
        if name.startswith("diffcore"):
            unet = UNet(cfg)
            unet.load_state_dict(weights)
            unet.to(args.device)
            sides[name] = Side(
                name,
                unet,
                lambda m=unet: m(x, t, ctx, pooled=pooled, time_ids=time_ids),
                target,
                args.optimizer,
            )
            sides[name].model = SDModel(SDXLConfig(), unet, {}, {})
        else:
            module = UNet2DConditionModel(**cfg.to_diffusers(sample_size=s))
            module.load_state_dict(weights)
            module.to(args.device)
            sides[name] = Side(
                name,
                module,
                lambda m=module: m(x, t, ctx, added_cond_kwargs=added).sample,
                target,
                args.optimizer,
            )
    del ref
    return sides


def flux_sides(args: argparse.Namespace, folder: Path) -> dict[str, Side]:
    from flux_step import build, inputs, write_reference

    ns = argparse.Namespace(
        variant="dev", hidden=256, heads=4, depth=2, depth_single=4, latent=args.flux_latent, txt_len=64,
        text_dim=256, pooled_dim=128, batch=args.flux_batch, device=args.device, dtype="float32",
        checkpointing=False,
    )  # fmt: skip
    write_reference(ns, folder)
    x = inputs(ns)
    sides = {}
    for name in SIDES:
        which = name.split()[0]
        module, forward = build(which, ns, folder)
        sides[name] = Side(name, module, lambda f=forward: f(x), x["target"], args.optimizer)
        if which == "diffcore":
            sides[name].model = _Blocks(module, ["double_blocks", "single_blocks"])
    return sides


def compile_side(name: str, side: Side, mode: str) -> None:
    """Compile a compiled side's blocks or whole backbone (lazily: the first step compiles)."""
    if name == "diffcore compiled":
        from diffcore.training.compile import compile_backbone

        compile_backbone(side.model, mode)
    elif name == "diffusers compiled":
        if mode == "blocks":
            side.module.compile_repeated_blocks()
        else:
            side.module.compile()  # torch.compile of the module's call, in place


def run(arch: str, args: argparse.Namespace, folder: Path) -> dict[str, Side]:
    import torch
    from torch._dynamo.utils import counters

    sides = {"dit": dit_sides, "sdxl": sdxl_sides, "flux": flux_sides}[arch](args, folder)
    for name, side in sides.items():
        compile_side(name, side, args.compile)
        breaks = sum(counters["graph_break"].values())
        start = time.perf_counter()  # wall time: compiling runs worker processes
        side.first_loss = float(side.step())
        side.compile_s = time.perf_counter() - start
        for _ in range(args.warmup):
            side.step()
        side.graph_breaks = sum(counters["graph_break"].values()) - breaks
    order = list(sides.values())
    cpu = not args.device.startswith("cuda")
    clock = time.process_time if cpu else time.perf_counter
    for i in range(args.steps):
        # each round starts with the next side: no side always follows the same one
        for side in order[i % len(order) :] + order[: i % len(order)]:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = clock()
            side.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            side.times.append(clock() - start)
    return sides


def report(arch: str, sides: dict[str, Side]) -> None:
    ms = {name: statistics.median(side.times) * 1e3 for name, side in sides.items()}
    print(f"{arch}:")
    for name, side in sides.items():
        line = f"  {name:18s} {ms[name]:9.1f} ms/step  first loss {side.first_loss:.6f}"
        if name.endswith("compiled"):
            line += f"  compile {max(side.compile_s - ms[name] / 1e3, 0.0):6.1f} s  graph breaks {side.graph_breaks}"
        print(line)
    ours = ms["diffcore compiled"]
    print(
        f"  diffcore compiled / diffusers eager {ours / ms['diffusers eager']:.3f} (target <= 0.8)  "
        f"/ diffusers compiled {ours / ms['diffusers compiled']:.3f} (target <= 1.0)  "
        f"diffcore compiled / eager {ours / ms['diffcore eager']:.3f}",
        flush=True,
    )


def warm_up_inductor() -> None:
    """Compile a trivial train step once, so the process's one-time costs (inductor's imports, the
    C++ toolchain probe and headers) are not charged to whichever side compiles first."""
    import torch

    layer = torch.nn.Linear(8, 8)
    step = torch.compile(lambda x: torch.nn.functional.gelu(layer(x)).sum())
    step(torch.randn(2, 8)).backward()
    torch._dynamo.reset()


def main() -> None:
    args = parse()
    cache = None
    if not args.warm_cache:  # compile times measured cold, not read back from an earlier run's cache
        cache = tempfile.TemporaryDirectory()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__} on {args.device}, {torch.get_num_threads()} thread(s), fp32, full finetune + "
        + (
            "each trainer's AdamW (diffcore's built-in, torch's defaults for diffusers)"
            if args.optimizer == "own"
            else "torch's default AdamW on every side"
        )
        + (", CPU time" if args.device == "cpu" else "")
        + f", compile {args.compile}"
    )
    warm_up_inductor()
    for arch in args.only or ARCHES:
        with tempfile.TemporaryDirectory() as tmp:
            report(arch, run(arch, args, Path(tmp) / arch))


if __name__ == "__main__":
    main()
