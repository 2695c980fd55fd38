"""The Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

Module names follow facebookresearch/DiT ``models.py`` so that the original checkpoint layout is
nearly the identity (see :mod:`diffcore_dit.convert`). Numerics follow diffusers'
``DiTTransformer2DModel``, the parity reference: the timestep sinusoid uses a frequency shift of 1 and
[cos, sin] order, and at other resolutions the positional grid is stretched over the native one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.nn import TimestepMLP, attention, checkpointed, modulate, timestep_embedding
from diffcore_dit.config import DiTArch

FREQ_DIM = 256  # width of the timestep sinusoid before its MLP, in every published DiT


def sincos_grid(
    rows: int, cols: int, dim: int, base: int, device: torch.device | None = None
) -> torch.Tensor:
    """Fixed 2-D sin-cos positions, (1, rows*cols, dim): the first half encodes the column, the second
    the row; positions are stretched so that any grid spans the native ``base`` x ``base`` one."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64, device=device) * (base / n)
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)  # (n, dim/2)

    col = axis(cols)[None, :, :].expand(rows, cols, -1)
    row = axis(rows)[:, None, :].expand(rows, cols, -1)
    return torch.cat([col, row], dim=-1).reshape(1, rows * cols, dim).float()


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, hidden)


class LabelEmbedder(nn.Module):
    """One row per class plus the null class (index ``num_classes``) used for guidance; dropping labels
    is the training method's job, so this is a plain lookup."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # fused: one GEMM instead of three
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        )
        return self.proj(attention(q, k, v))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Self-attention and MLP, each behind an adaLN-Zero modulation (shift, scale, gate) of the condition."""

    def __init__(self, arch: DiTArch):
        super().__init__()
        h = arch.hidden_size
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(h, arch.num_heads)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=arch.norm_eps)
        self.mlp = Mlp(h, arch.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """``forward(x (B, C, H, W), t (B,) float timesteps in [0, 1000), y (B,) class ids) -> (B, C_out, H, W)``."""

    def __init__(self, arch: DiTArch):
        super().__init__()
        self.arch = arch
        h, p = arch.hidden_size, arch.patch_size
        self.x_embedder = PatchEmbed(arch.in_channels, h, p)
        self.t_embedder = TimestepMLP(FREQ_DIM, h)
        self.y_embedder = LabelEmbedder(arch.num_classes, h)
        self.blocks = nn.ModuleList(DiTBlock(arch) for _ in range(arch.depth))
        self.final_layer = FinalLayer(h, p, arch.out_channels)
        self.gradient_checkpointing = False
        # Fixed, so not saved in diffcore's state dict; rebuilt by init_buffers after a meta-device load.
        self.register_buffer("pos_embed", torch.empty(1, self.grid**2, h), persistent=False)
        self.init_buffers()

    @property
    def grid(self) -> int:
        return self.arch.input_size // self.arch.patch_size

    def init_buffers(self) -> None:
        device = self.pos_embed.device
        if device.type != "meta":
            pos = sincos_grid(self.grid, self.grid, self.arch.hidden_size, self.grid, device)
            self.pos_embed = pos.to(self.pos_embed.dtype)

    def initialize_weights(self) -> None:
        """The original DiT initialisation: xavier linears, zeroed adaLN and output (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def positions(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        if rows == cols == self.grid:
            return self.pos_embed.to(like.dtype)
        return sincos_grid(rows, cols, self.arch.hidden_size, self.grid, like.device).to(like.dtype)

    def condition(self, t: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        freqs = timestep_embedding(t, FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=1.0)
        return self.t_embedder(freqs.to(dtype)) + self.y_embedder(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        p = self.arch.patch_size
        rows, cols = height // p, width // p
        tokens = self.x_embedder(x)
        tokens = tokens + self.positions(rows, cols, tokens)
        c = self.condition(t.expand(b) if t.ndim == 0 else t, y, tokens.dtype)
        for block in self.blocks:
            tokens = checkpointed(block, tokens, c, enabled=self.gradient_checkpointing)
        out = self.final_layer(tokens, c)  # (B, L, p*p*C)
        out = out.view(b, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, -1, rows * p, cols * p)
