"""The Flux.2 transformer, BFL module names (black-forest-labs/flux2).

What differs from Flux.1 (:mod:`diffcore_flux.network`): no Linear has a bias; no pooled-text
``vector_in``; the modulation is shared, computed once per forward by the top-level
``double_stream_modulation_img/txt`` (6 chunks each) and ``single_stream_modulation`` (3 chunks) and
handed to every block; the MLPs are SwiGLU (``silu(gate) * value``, gate half first), so a double
block's ``img_mlp.0`` emits 2 * mlp_hidden and a single block's fused ``linear1`` emits
3 * dim + 2 * mlp_hidden; RoPE runs over 4 axes (t, h, w, l) with theta 2000. The QK-norm modules are
Flux.1's; the norms, the fused projections' split into heads, SwiGLU and RoPE go through
:mod:`diffcore_flux.flux2.lean`.
"""

from __future__ import annotations

import torch
from torch import nn

from diffcore.nn import RMSNorm, attention, checkpointed, rope_frequencies, timestep_embedding
from diffcore_flux.flux2.config import Flux2Shape
from diffcore_flux.flux2.lean import (
    norm_modulate,
    rms_rope,
    rope_cis,
    split_heads,
    split_heads_swiglu,
    swiglu,
)
from diffcore_flux.network import QKNorm

#: the complex RoPE table (L, head_dim / 2)
Rope = torch.Tensor
Mod = tuple[torch.Tensor, ...]


def _norm_rope(norm: RMSNorm, x: torch.Tensor, rope: Rope) -> torch.Tensor:
    return rms_rope(x, norm.weight, rope, norm.eps)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class SwiGLU(nn.Module):
    """``silu(x[..., :n]) * x[..., n:]``: the gate half comes first (BFL and diffusers agree)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


class MLPEmbedder(nn.Module):
    """``in_layer -> SiLU -> out_layer`` without biases (time and guidance inputs)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = _linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = _linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """The shared adaptive-norm parameters: ``count`` chunks of (B, dim) from the time vector."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.lin = _linear(dim, count * dim)

    def forward(self, vec: torch.Tensor) -> Mod:
        return self.lin(nn.functional.silu(vec)).chunk(self.count, dim=-1)


class SelfAttention(nn.Module):
    """One stream's fused ``qkv``, per-head QK ``norm`` and output ``proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = _linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = _linear(dim, dim)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(_linear(dim, 2 * hidden), SwiGLU(), _linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text first)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        # the pre-norms have no parameters: norm_modulate is each norm and its modulation in one op
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_attn", SelfAttention(dim, heads))
            self.add_module(f"{stream}_mlp", _mlp(dim, mlp_hidden))

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, img_mod: Mod, txt_mod: Mod, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_txt = txt.shape[1]
        img_q, img_k, img_v = self._qkv(self.img_attn, img, img_mod, rope[..., n_txt:, :])
        txt_q, txt_k, txt_v = self._qkv(self.txt_attn, txt, txt_mod, rope[..., :n_txt, :])
        out = attention(
            torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2), torch.cat((txt_v, img_v), dim=2)
        )
        # split, not two slices: its backward is one concatenation, not two zero-filled copies
        txt_out, img_out = out.split((n_txt, img.shape[1]), dim=1)
        img = self._residual(img, img_out, img_mod, self.img_attn, self.img_mlp)
        txt = self._residual(txt, txt_out, txt_mod, self.txt_attn, self.txt_mlp)
        return img, txt

    @staticmethod
    def _qkv(attn: SelfAttention, x: torch.Tensor, mod: Mod, rope: Rope):
        q, k, v = split_heads(attn.qkv(norm_modulate(x, mod[0], mod[1])), attn.heads)
        return _norm_rope(attn.norm.query_norm, q, rope), _norm_rope(attn.norm.key_norm, k, rope), v

    @staticmethod
    def _residual(x, attn_out, mod: Mod, attn: SelfAttention, mlp: nn.Module) -> torch.Tensor:
        _, _, gate1, shift2, scale2, gate2 = mod
        x = torch.addcmul(x, gate1[:, None], attn.proj(attn_out))
        return torch.addcmul(x, gate2[:, None], mlp(norm_modulate(x, shift2, scale2)))


class SingleStreamBlock(nn.Module):
    """One stream over the joined sequence; attention and the SwiGLU MLP from one fused ``linear1``.

    ``rows`` (the last block: the tokens the final layer reads) computes the queries, the MLP and
    ``linear2`` for those rows only; keys and values still come from every token.
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.dim = dim
        self.mlp_hidden = mlp_hidden
        self.linear1 = _linear(dim, 3 * dim + 2 * mlp_hidden)
        self.linear2 = _linear(dim + mlp_hidden, dim)
        self.norm = QKNorm(dim // heads)

    def forward(self, x: torch.Tensor, mod: Mod, rope: Rope, rows: slice | None = None) -> torch.Tensor:
        shift, scale, gate = mod
        y = self.linear1(norm_modulate(x, shift, scale))
        q, k, v, mlp = split_heads_swiglu(y, self.heads, self.mlp_hidden, rows)
        q_rope = rope
        if rows is not None:
            x, q_rope = x[:, rows], rope[..., rows, :]
        q, k = _norm_rope(self.norm.query_norm, q, q_rope), _norm_rope(self.norm.key_norm, k, rope)
        attn = attention(q, k, v)
        out = self.linear2(torch.cat((attn, mlp), dim=-1))
        return torch.addcmul(x, gate[:, None], out)


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = _linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(norm_modulate(x, shift, scale))


class Flux2Transformer(nn.Module):
    """Flux.2 backbone over flattened latent tokens (the autoencoder already patchified 2x2).

    ``forward(img, img_ids, txt, txt_ids, timesteps, guidance=None, keep=None)``: ``img`` (B, N,
    in_channels) target tokens followed by any reference tokens, ``txt`` (B, L, context_in_dim) stacked
    LLM states, ``*_ids`` (N, 4) or (B, N, 4) positions (t, h, w, l); ``timesteps``/``guidance`` (B,) in
    [0, 1] (scaled by 1000 here). Returns (B, keep or N, out_channels): the first ``keep`` image tokens.
    """

    def __init__(self, shape: Flux2Shape):
        super().__init__()
        self.shape = shape
        dim, heads = shape.hidden_size, shape.num_heads
        if dim % heads or sum(shape.axes_dim) != dim // heads:
            raise ValueError(f"axes_dim {shape.axes_dim} must sum to the head size {dim}/{heads}")
        mlp_hidden = shape.mlp_hidden
        self.img_in = _linear(shape.in_channels, dim)
        self.txt_in = _linear(shape.context_in_dim, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.guidance_in = MLPEmbedder(256, dim) if shape.guidance_embed else nn.Identity()
        self.double_stream_modulation_img = Modulation(dim, 6)
        self.double_stream_modulation_txt = Modulation(dim, 6)
        self.single_stream_modulation = Modulation(dim, 3)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads, mlp_hidden) for _ in range(shape.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, mlp_hidden) for _ in range(shape.depth_single)
        )
        self.final_layer = LastLayer(dim, shape.out_channels)
        self.gradient_checkpointing = False

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> torch.Tensor:
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(_embed_time(timesteps, dtype))
        if self.shape.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux.2 transformer embeds guidance: pass guidance=")
            vec = vec + self.guidance_in(_embed_time(guidance, dtype))
        txt = self.txt_in(txt.to(dtype))
        # computed once per forward and shared by every block (Flux.1 has one modulation per block)
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)
        rope = rope_cis(*rope_frequencies(torch.cat((txt_ids, img_ids), dim=-2), self.shape.axes_dim, self.shape.theta))
        on = self.gradient_checkpointing
        for block in self.double_blocks:
            img, txt = checkpointed(block, img, txt, img_mod, txt_mod, rope, enabled=on)
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        # only the image tokens (the first ``keep``) reach the final layer: the last block computes
        # nothing else past its keys and values
        rows = slice(n_txt, x.shape[1] if keep is None else n_txt + keep)
        last = len(self.single_blocks) - 1
        for i, block in enumerate(self.single_blocks):
            x = checkpointed(block, x, single_mod, rope, rows if i == last else None, enabled=on)
        if not self.single_blocks:
            x = x[:, rows]
        return self.final_layer(x, vec)


def _embed_time(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 1000 * sigma with [cos, sin] and no frequency shift, as Flux.1
    t = t.reshape(-1).to(dtype) * 1000
    return timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0).to(dtype)
