"""The SD3 / SD3.5 MMDiT (and SD3.5 medium's MMDiT-X), with Stability's original module names.

Module paths follow the original single file (``joint_blocks.i.x_block.attn.qkv``,
``joint_blocks.i.context_block.mlp.fc1``), so kohya/ComfyUI LoRA names are the module paths
themselves; the diffusers layout is a key map (:mod:`diffcore_sd3.convert`). Every block attends over
the image tokens followed by the text tokens; the last block's text stream only feeds that attention
(modulation, q/k/v; no output projection, no MLP).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from diffcore.nn import attention, checkpointed, timestep_embedding
from diffcore_sd3.config import TransformerShape
from diffcore_sd3.fused import modulated_layer_norm, modulated_layer_norms, rms_norm


class RMSNorm(nn.Module):
    """Per-head q/k RMS norm (SD3.5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, 1e-6)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Embedder(nn.Module):
    """``mlp.0 -> SiLU -> mlp.2``: the time and pooled-text embedders."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SelfAttention(nn.Module):
    """Fused ``qkv``, optional per-head ``ln_q``/``ln_k`` and (unless pre-only) the output ``proj``."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = RMSNorm(dim // heads) if qk_norm else None
        self.ln_k = RMSNorm(dim // heads) if qk_norm else None
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, dim) -> q, k, v each (B, H, L, D), q and k normed."""
        # unbound along the fused dimension, so that backward stacks the three gradients straight into
        # the (B, L, 3, H, D) layout of the projection's output (no further copy)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2))
        if self.ln_q is not None and self.ln_k is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class Modulation(nn.Sequential):
    """``adaLN_modulation``: SiLU then a linear giving ``count`` (B, dim) chunks."""

    def __init__(self, dim: int, count: int):
        super().__init__(nn.SiLU(), nn.Linear(dim, count * dim))
        self.count = count

    def chunks(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(vec).chunk(self.count, dim=-1)


class StreamBlock(nn.Module):
    """One stream of a joint block: ``adaLN_modulation``, ``attn`` (+ ``attn2`` for MMDiT-X), ``mlp``.

    Modulation chunks: (shift, scale, gate) for attention, then for the MLP, then for attn2; a
    pre-only stream has shift and scale only.
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool, *, pre_only: bool, dual: bool):
        super().__init__()
        self.pre_only = pre_only
        self.adaLN_modulation = Modulation(dim, 2 if pre_only else (9 if dual else 6))
        self.attn = SelfAttention(dim, heads, qk_norm, pre_only)
        self.attn2 = SelfAttention(dim, heads, qk_norm) if dual else None
        if not pre_only:
            self.mlp = Mlp(dim, mlp_hidden)

    # The layer norms have no parameters (modulation replaces their affine part), so each one and its
    # modulation are one function that recomputes the normed tensor in backward.
    def pre_attention(self, x: torch.Tensor, vec: torch.Tensor):
        """(q, k, v), the modulation chunks, and for MMDiT-X attn2's input (the same norm of x under
        its own shift and scale)."""
        mod = self.adaLN_modulation.chunks(vec)
        if self.attn2 is None:
            return self.attn.qkv_heads(modulated_layer_norm(x, mod[0], mod[1])), mod, None
        first, second = modulated_layer_norms(x, (mod[0], mod[1]), (mod[6], mod[7]))
        return self.attn.qkv_heads(first), mod, second

    def post_attention(
        self, x: torch.Tensor, attn_out: torch.Tensor, mod: tuple[torch.Tensor, ...], attn2_in: torch.Tensor | None
    ) -> torch.Tensor:
        _, _, gate1, shift2, scale2, gate2 = mod[:6]
        assert self.attn.proj is not None
        x = torch.addcmul(x, gate1[:, None], self.attn.proj(attn_out))
        if self.attn2 is not None and attn2_in is not None:
            # MMDiT-X: image-only attention on the block input's norm, with its own gate
            gate3 = mod[8]
            q, k, v = self.attn2.qkv_heads(attn2_in)
            assert self.attn2.proj is not None
            # v on its own: attention keeps its inputs, and a view would keep the whole fused output
            x = torch.addcmul(x, gate3[:, None], self.attn2.proj(attention(q, k, v.contiguous())))
        return torch.addcmul(x, gate2[:, None], self.mlp(modulated_layer_norm(x, shift2, scale2)))


class JointBlock(nn.Module):
    """Image (``x_block``) and text (``context_block``) streams attending jointly, image tokens first."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qk_norm: bool, *, last: bool, dual: bool):
        super().__init__()
        self.x_block = StreamBlock(dim, heads, mlp_hidden, qk_norm, pre_only=False, dual=dual)
        self.context_block = StreamBlock(dim, heads, mlp_hidden, qk_norm, pre_only=last, dual=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (xq, xk, xv), x_mod, x2 = self.x_block.pre_attention(x, vec)
        (cq, ck, cv), c_mod, _ = self.context_block.pre_attention(c, vec)
        k, v = torch.cat((xk, ck), dim=2), torch.cat((xv, cv), dim=2)
        if self.context_block.pre_only:
            # the last block's text outputs are discarded: only the image tokens ask
            return self.x_block.post_attention(x, attention(xq, k, v), x_mod, x2), c
        out = attention(torch.cat((xq, cq), dim=2), k, v)
        n = x.shape[1]
        x = self.x_block.post_attention(x, out[:, :n], x_mod, x2)
        return x, self.context_block.post_attention(c, out[:, n:], c_mod, None)


class PatchEmbed(nn.Module):
    """``proj``: a patch-size convolution; the position table is cropped around its centre."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = Modulation(dim, 2)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation.chunks(vec)
        return self.linear(modulated_layer_norm(x, shift, scale))


def sincos_positions(dim: int, grid: int, base: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sin-cos table, row-major; the first half of the features encodes the
    column and the second the row, positions scaled by ``base / grid`` (the SD3 reference table)."""
    pos = torch.arange(grid, dtype=torch.float64) / (grid / base)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    angles = pos[:, None] * omega[None]
    one = torch.cat((angles.sin(), angles.cos()), dim=1)  # (grid, dim / 2)
    cols = one[None, :, :].expand(grid, grid, -1)
    rows = one[:, None, :].expand(grid, grid, -1)
    return torch.cat((cols, rows), dim=-1).reshape(grid * grid, dim).float()


class SD3Transformer(nn.Module):
    """The MMDiT backbone.

    ``forward(x, timesteps, context, pooled, skip_layers=())``: ``x`` (B, C, H, W) latents, ``timesteps``
    (B,) sigmas in [0, 1] (scaled by 1000 here), ``context`` (B, L, context_dim) text states, ``pooled``
    (B, pooled_dim); ``skip_layers`` are block indices passed over (skip-layer guidance). Returns the
    velocity (B, C, H, W).
    """

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.shape = shape
        dim, heads, patch = shape.hidden_size, shape.num_heads, shape.patch_size
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not a multiple of num_heads {heads}")
        mlp_hidden = int(dim * shape.mlp_ratio)
        self.x_embedder = PatchEmbed(shape.in_channels, dim, patch)
        table = sincos_positions(dim, shape.pos_embed_max_size, shape.sample_size // patch)
        self.register_buffer("pos_embed", table[None], persistent=True)
        self.t_embedder = Embedder(256, dim)
        self.y_embedder = Embedder(shape.pooled_dim, dim)
        self.context_embedder = nn.Linear(shape.context_dim, dim)
        dual = set(shape.dual_attention_layers)
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, heads, mlp_hidden, shape.qk_norm, last=i == shape.depth - 1, dual=i in dual)
            for i in range(shape.depth)
        )
        self.final_layer = FinalLayer(dim, patch * patch * shape.in_channels)
        self.gradient_checkpointing = False

    def cropped_positions(self, h: int, w: int) -> torch.Tensor:
        size = self.shape.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(
                f"{h}x{w} patches exceed the position table ({size}x{size}): the image is too large"
            )
        top, left = (size - h) // 2, (size - w) // 2
        table = self.pos_embed.reshape(1, size, size, -1)
        return table[:, top : top + h, left : left + w].reshape(1, h * w, -1)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        skip_layers: Collection[int] = (),
    ) -> torch.Tensor:
        b, c, height, width = x.shape
        p = self.shape.patch_size
        h, w = height // p, width // p
        dtype = self.context_embedder.weight.dtype
        # the patch embedding is (B, D, L) transposed: make it contiguous once, or every linear copies it
        tokens = (self.x_embedder(x.to(dtype)) + self.cropped_positions(h, w).to(dtype)).contiguous()
        t = timestep_embedding(
            timesteps.reshape(-1).float() * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0
        ).to(dtype)
        vec = self.t_embedder(t) + self.y_embedder(pooled.to(dtype))
        ctx = self.context_embedder(context.to(dtype))
        on = self.gradient_checkpointing
        for i, block in enumerate(self.joint_blocks):
            if i not in skip_layers:
                tokens, ctx = checkpointed(block, tokens, ctx, vec, enabled=on)
        out = self.final_layer(tokens, vec)
        out = out.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, height, width)
