"""Peak GPU memory and step time of a Flux.1-dev-shaped LoRA step at 1024 px, beside diffcore plan's
predictions, with each memory option alone.

    python benchmarks/gpu_memory.py [--resolution 1024] [--steps 3] [--cases base,swap16,...] [--predict-only]

CUDA only: on a machine without one it says so and exits 0 (``--predict-only`` prints the planner's
figures anyway: they need no GPU). The model has the released dev transformer's shapes (hidden 3072,
19 double and 38 single blocks, 12B parameters) with random weights in bf16; the text encoders are
one-layer stand-ins with the released output widths (T5 4096 over 512 tokens, CLIP 768 pooled) and
the autoencoder a narrow one with the released 16 latent channels and 8x downscale, so the memory
measured is the transformer's. Every case trains a rank-16 LoRA (batch 1, bf16, AdamW) through
``diffcore run``'s own loop, in its own process (``python -m diffcore.plan.measure``): the peak is
``torch.cuda.max_memory_allocated`` over the training steps, the step time the mean of the steps
after the first. Cases (each is the base plus one option):

    base        gradient checkpointing on (the usual setting at 1024 px)
    plain       no checkpointing
    swap16      train.blocks_to_swap: 16
    int8, nf4   model.quantize (diffcore.quantize, torchao)
    adamw8bit   train.optimizer: adamw8bit (diffcore-optimizers, bitsandbytes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

DEV = {"hidden_size": 3072, "num_heads": 24, "depth": 19, "depth_single": 38, "axes_dim": [16, 56, 56],
       "in_channels": 64, "vec_in_dim": 768, "context_in_dim": 4096}  # fmt: skip
CASES: dict[str, dict[str, Any]] = {
    "base": {},
    "plain": {"train.gradient_checkpointing": False},
    "swap16": {"train.blocks_to_swap": 16},
    "int8": {"model.quantize": "int8"},
    "nf4": {"model.quantize": "nf4"},
    "adamw8bit": {"train.optimizer": {"type": "adamw8bit"}},
}


def _text_encoders(root: Path) -> dict[str, str]:
    """One-layer CLIP and T5 with the released widths (768 pooled, 4096 per token), random."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffcore.testing.tokenizers import clip_tokenizer, t5_tokenizer

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=60, hidden_size=768, intermediate_size=256, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=60, d_model=4096, d_ff=256, d_kv=64, num_heads=4, num_layers=1,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0))  # fmt: skip
    parts = {
        "text_encoder": clip,
        "text_encoder_2": t5,
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": t5_tokenizer(),
    }
    for name, part in parts.items():
        part.save_pretrained(root / name)
    return {name: str(root / name) for name in parts}


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def _job(root: Path, text: dict[str, str], case: str, resolution: int, steps: int) -> Path:
    vae = {
        "block_out_channels": [16, 16, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": 16,
    }
    job: dict[str, Any] = {
        "output_dir": str(root / f"run-{case}"),
        "model": {
            "type": "flux",
            **text,
            **DEV,
            "dtype": "bfloat16",
            "vae_options": vae,
            "max_sequence_length": 512,
        },
        "adapter": {"type": "lora", "rank": 16},
        "data": {"type": "synthetic", "resolution": resolution, "size": 4},
        "train": {
            "steps": steps,
            "batch_size": 1,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "log_every": 1,
        },  # fmt: skip
        "callbacks": [{"type": "progress", "enabled": False}],
    }
    for key, value in CASES[case].items():
        _set(job, key, value)
    path = root / f"{case}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _predict(job_file: Path) -> int:
    from diffcore.api import build_component
    from diffcore.config.job import load_job
    from diffcore.plan.costs import estimate
    from diffcore.plan.inventory import inventory
    from diffcore.plan.search import settings_of

    job = load_job(job_file)
    inv = inventory(job, build_component("dataset", job.data.type, job.data.config))
    return estimate(
        inv, settings_of(job), precision=job.train.mixed_precision, tflops=job.train.peak_tflops
    ).device


def _measure(job_file: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "diffcore.plan.measure", str(job_file)], capture_output=True,
                         text=True, env={**os.environ, "DIFFCORE_DEBUG": ""})  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("DIFFCORE_MEASURED ")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail[:160]}
    return json.loads(lines[-1].split(" ", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument(
        "--predict-only", action="store_true", help="the planner's figures only (no GPU needed)"
    )
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    import torch

    if not args.predict_only and not torch.cuda.is_available():
        print("gpu_memory.py measures CUDA memory and needs a CUDA device; none is available here "
              "(--predict-only prints the planner's predictions without one)")  # fmt: skip
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(
        f"Flux.1-dev-shaped LoRA (rank 16) at {args.resolution} px, batch 1, bf16, random weights; {device}"
    )
    print(f"{'case':<10} {'predicted GiB':>14} {'measured GiB':>13} {'error':>7} {'step s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = _text_encoders(root / "text")
        for case in cases:
            job_file = _job(root, text, case, args.resolution, args.steps)
            predicted = _predict(job_file)
            if args.predict_only:
                print(f"{case:<10} {predicted / 2**30:>14.2f} {'-':>13} {'-':>7} {'-':>8}", flush=True)
                continue
            found = _measure(job_file)
            if "error" in found:
                print(f"{case:<10} {predicted / 2**30:>14.2f}  failed: {found['error']}", flush=True)
                continue
            peak = found["peak"]
            print(f"{case:<10} {predicted / 2**30:>14.2f} {peak / 2**30:>13.2f} {predicted / peak - 1:>+7.1%} "
                  f"{found['step_s']:>8.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
