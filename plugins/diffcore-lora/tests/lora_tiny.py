"""Tiny models shared by the adapter tests."""

from __future__ import annotations

import logging

import torch
from torch import nn

from diffcore.model import DiffusionModel


class Block(nn.Module):
    """Attention-like projections, an MLP and a conv, with diffusers-style names."""

    def __init__(self, dim: int = 16, channels: int = 8):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Conv2d(channels, 4, 1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.to_q(x) + self.to_k(x)
        h = h + self.ff(h)
        return h, self.proj(self.conv(img))


class TinyNet(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for block in self.blocks:
            x, y = block(x, img)
            outs.append(y)
        return x, sum(outs)


class TinyTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.fc1 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.q_proj(x))


class TinyModel(DiffusionModel):
    adapter_targets = [r"to_(q|k)$", r"ff\.\d+$", r"conv$"]


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, 6, 6, generator=g)


def randomize(params, seed: int = 3, std: float = 0.2) -> None:
    """Give adapter parameters non-zero values so a zero-initialised update is not trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


class DiffusersWarnings(logging.Handler):
    """Collects diffusers' warnings (an unused LoRA key is reported as one)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def watch_diffusers() -> DiffusersWarnings:
    handler = DiffusersWarnings()
    logging.getLogger("diffusers").addHandler(handler)
    return handler


def unused_key_warning(message: str) -> bool:
    """diffusers' warnings for LoRA keys it did not use (the converters raise on leftovers)."""
    return "unexpected keys" in message or "Unsupported keys" in message


def lora_layers(module: torch.nn.Module) -> int:
    """How many PEFT-injected layers of ``module`` hold a LoRA."""
    return sum(1 for m in module.modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
