"""Method plugins against the default ``diffusion`` method: one training step on the same model and batch.

A step is the method's ``loss`` (noise, conditioning, prediction, regression) with the step's random
stream, backward, and an AdamW step over what the method trains. The two methods step alternately in
one process (a busy machine slows both alike); the median step times and the ratio method / default
are printed. Each case is a function ``case(args) -> (name, default_step, method_step)`` in ``CASES``,
so other method plugins add theirs beside these.

    python benchmarks/methods_step.py                    # every case, CPU-sized
    python benchmarks/methods_step.py dreambooth --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Step = Callable[[], None]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="*", help=f"cases to run (default: all of {', '.join(CASES)})")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    return p.parse_args()


def trainer(method: Any, model: Any, dataset: Any, batch: dict[str, Any], device: str) -> Step:
    """A step function: the method set up as the loop sets it up (``fake_context``), AdamW over what
    it trains, a fresh random stream per step."""
    from diffcore.context import StepRandom
    from diffcore.testing import fake_context

    ctx = fake_context(model, method=method, dataset=dataset)
    ctx.device = torch.device(device)
    for module in ctx.method_modules.values():
        module.to(device)
    opt = torch.optim.AdamW(ctx.trainable, lr=1e-5)
    state = {"step": 0}

    def step() -> None:
        ctx.step_random = StepRandom(0, state["step"])
        state["step"] += 1
        loss, _ = method.loss(ctx, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# -- cases ----------------------------------------------------------------------------------------
def dreambooth(args: argparse.Namespace) -> tuple[str, Step, Step]:
    """DiT-S/4-shaped (depth 6), pixel space 32x32, full finetune; prior preservation doubles the
    examples the model runs on (instance + class)."""
    from diffcore_dreambooth.config import DreamBoothConfig
    from diffcore_dreambooth.method import DreamBoothMethod
    from PIL import Image

    import diffcore
    from diffcore.methods.config import DiffusionMethodConfig
    from diffcore.methods.diffusion import DiffusionMethod
    from diffcore.testing import first_batch

    dit = dict(hidden_size=384, depth=6, num_heads=6, patch_size=4, in_channels=3, input_size=32, num_classes=4)
    dataset = diffcore.build_component("dataset", "synthetic", {"resolution": 32, "size": max(8, args.batch)})
    batch = first_batch(dataset, args.batch)
    folder = Path(tempfile.mkdtemp(prefix="bench-classes-"))
    for i in range(8):  # given class images: the step is measured, not the one-off generation
        pixels = ((dataset[i]["pixels"] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")

    def model() -> Any:
        torch.manual_seed(0)
        return diffcore.load_model("dit", **dit).to(args.device)

    default = trainer(DiffusionMethod(DiffusionMethodConfig()), model(), dataset, batch, args.device)
    config = DreamBoothConfig(class_label=1, class_dir=str(folder), num_class_images=8, generate=False)
    method = trainer(DreamBoothMethod(config), model(), dataset, batch, args.device)
    return f"dreambooth (DiT 384x6, 32 px, batch {args.batch}+{args.batch})", default, method


def _tokenizer(folder: Path) -> int:
    """A small CLIP BPE vocabulary written to ``folder``; returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {}
    for c in "!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~" + letters:
        vocab.setdefault(c, len(vocab))
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(str(folder))
    return len(vocab)


def textual_inversion(args: argparse.Namespace) -> tuple[str, Step, Step]:
    """SD1.5-shaped UNet (64/128/256 wide, 768 context) and a 6-layer CLIP-L-wide text encoder on
    16x16 latents: the default method finetunes the UNet; textual inversion trains one token vector
    through the frozen UNet and text encoder."""
    from diffcore_textual_inversion.config import TextualInversionConfig
    from diffcore_textual_inversion.method import TextualInversionMethod

    import diffcore
    from diffcore.methods.config import DiffusionMethodConfig
    from diffcore.methods.diffusion import DiffusionMethod

    folder = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    vocab = _tokenizer(folder)
    options = dict(
        autoencoder=False,
        tokenizer=str(folder),
        unet={"block_out_channels": (64, 128, 256), "attention": (True, True, False), "transformer_layers": (1, 1, 1), "heads": (2, 4, 8)},
        text_encoder={"vocab_size": vocab, "num_hidden_layers": 6},
    )
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(args.batch, 4, 16, 16, generator=g),
        "captions": ["a photo of <toy> on a table"] * args.batch,
    }

    def model() -> Any:
        torch.manual_seed(0)
        return diffcore.load_model("sd15", **options).to(args.device)

    default = trainer(DiffusionMethod(DiffusionMethodConfig()), model(), None, batch, args.device)
    ti = TextualInversionMethod(TextualInversionConfig(placeholder_token="<toy>", initializer_token="toy"))
    method = trainer(ti, model(), None, batch, args.device)
    return f"textual_inversion (SD1.5-shaped, 16x16 latents, batch {args.batch})", default, method


CASES: dict[str, Callable[[argparse.Namespace], tuple[str, Step, Step]]] = {
    "dreambooth": dreambooth,
    "textual_inversion": textual_inversion,
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(steps: tuple[Step, Step], args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds per step of each, stepping them alternately."""
    for _ in range(args.warmup):
        for step in steps:
            step()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(args.steps):
        for step, out in zip(steps, times):
            _sync(args.device)
            start = time.perf_counter()
            step()
            _sync(args.device)
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.cases or list(CASES):
        title, default, method = CASES[name](args)
        d, m = timed((default, method), args)
        print(f"{title}: default {d * 1000:.0f} ms/step, {name} {m * 1000:.0f} ms/step, ratio {m / d:.2f}")


if __name__ == "__main__":
    main()
