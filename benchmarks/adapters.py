"""Forward + backward of a LoRA-adapted layer: diffcore-lora against PEFT on the same shapes, in one run.

    python benchmarks/adapters.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 7] [--threads 1]

Each case wraps one frozen layer (a transformer projection, a Flux-sized projection on a GPU, a UNet
conv) with a rank-16 LoRA in both libraries, copies the same adapter tensors into both, and times
forward + backward of a summed output, the two implementations interleaved so a busy machine slows
both alike. Prints the median time per step and the ratio diffcore / PEFT (below 1.0: diffcore faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn


class _Model:
    """Just enough of the model protocol for attach(): a backbone and its target names."""

    adapter_targets = ["^layer$"]

    def __init__(self, layer: nn.Module):
        self.backbone = nn.Module()
        self.backbone.layer = layer
        self.frozen: dict[str, nn.Module] = {}


def _cases(device: str) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    big = device != "cpu"
    cases = [
        ("linear 320->320, 2x64 tokens (overhead)", nn.Linear(320, 320), (2, 64, 320)),
        ("linear 1024->1024, 2x512 tokens", nn.Linear(1024, 1024), (2, 512, 1024)),
        ("linear 1024->4096, 2x512 tokens", nn.Linear(1024, 4096), (2, 512, 1024)),
        ("conv3x3 128->128, 2x128x32x32", nn.Conv2d(128, 128, 3, padding=1), (2, 128, 32, 32)),
    ]
    if big:
        cases += [
            ("linear 3072->3072, 2x4096 tokens", nn.Linear(3072, 3072), (2, 4096, 3072)),
            ("linear 3072->21504, 1x4096 tokens", nn.Linear(3072, 21504), (1, 4096, 3072)),
            ("conv3x3 320->320, 2x320x128x128", nn.Conv2d(320, 320, 3, padding=1), (2, 320, 128, 128)),
        ]
    return cases


def _ours(layer: nn.Module, rank: int) -> tuple[nn.Module, list[nn.Parameter]]:
    from diffcore_lora.adapter import NetworkAdapter
    from diffcore_lora.config import LoraConfig

    model = _Model(layer)
    params = NetworkAdapter(LoraConfig(rank=rank, alpha=rank / 2), kind="lora").attach(model)
    return model.backbone.layer, params


def _peft(layer: nn.Module, rank: int) -> tuple[nn.Module, list[nn.Parameter]]:
    import peft

    holder = nn.Module()
    holder.layer = layer
    wrapped = peft.get_peft_model(
        holder, peft.LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=["layer"])
    )
    module = wrapped.base_model.model.layer
    return module, [p for p in wrapped.parameters() if p.requires_grad]


def _step(module: nn.Module, x: torch.Tensor) -> None:
    module(x).float().sum().backward()


def _time(module: nn.Module, params: list[nn.Parameter], x: torch.Tensor, iters: int, sync) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        for p in params:
            p.grad = None
        _step(module, x)
    sync()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--iters", type=int, default=0, help="steps per timing (default: 5 on CPU, 20 on GPU)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    iters = args.iters or (5 if device.type == "cpu" else 20)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    print(f"device {device}, dtype {args.dtype}, rank {args.rank}, median of {args.repeats} x {iters} steps")
    print(f"{'case':40s} {'diffcore ms':>12s} {'peft ms':>10s} {'ratio':>7s}")
    ratios = []
    for name, layer, shape in _cases(device.type):
        layer = layer.to(device=device, dtype=dtype).requires_grad_(False)
        ours, ours_params = _ours(copy.deepcopy(layer), args.rank)
        ref, ref_params = _peft(copy.deepcopy(layer), args.rank)
        with torch.no_grad():  # the same non-zero adapter in both
            for a, b in zip(ours_params, ref_params):
                a.copy_(torch.randn_like(a) * 0.02)
                b.copy_(a.view_as(b))
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        n = iters * (20 if x.numel() < 100_000 else 1)  # small layers: many steps per timing
        for module, params in ((ours, ours_params), (ref, ref_params)):  # warm up both
            _time(module, params, x, 2, sync)
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t_ours.append(_time(ours, ours_params, x, n, sync))
            t_ref.append(_time(ref, ref_params, x, n, sync))
        m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
        ratios.append(m_ours / m_ref)
        print(f"{name:40s} {m_ours * 1e3:12.3f} {m_ref * 1e3:10.3f} {m_ours / m_ref:7.3f}")
        del ours, ref, x
    print(f"geometric mean ratio diffcore / peft: {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
