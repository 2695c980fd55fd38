"""The Flux.1 transformer (MMDiT with double- and single-stream blocks), BFL module names.

Module paths follow black-forest-labs/flux (``double_blocks.i.img_attn.qkv``, ``single_blocks.i.linear1``),
so kohya/ComfyUI LoRA names are the module paths themselves; the diffusers layout is a key map
(:mod:`diffcore_flux.convert`). The one naming difference from BFL's files: the QK RMS-norm
gains are ``weight`` here (diffcore.nn.RMSNorm) and ``scale`` in BFL files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from diffcore.nn import (
    RMSNorm,
    apply_rope,
    attention,
    checkpointed,
    modulate,
    rope_frequencies,
    timestep_embedding,
)
from diffcore_flux.config import TransformerShape

Rope = tuple[torch.Tensor, torch.Tensor]


class MLPEmbedder(nn.Module):
    """``in_layer -> SiLU -> out_layer`` (BFL's names for time, guidance and pooled-text inputs)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """Adaptive-norm parameters from the conditioning vector: ``count`` chunks of (B, dim)."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.lin = nn.Linear(dim, count * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(nn.functional.silu(vec)).chunk(self.count, dim=-1)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, eps=1e-6)
        self.key_norm = RMSNorm(head_dim, eps=1e-6)


def _rms(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # The fused op (float32 statistics inside) keeps only its input and the inverse RMS for backward.
    return nn.functional.rms_norm(x, norm.weight.shape, norm.weight.to(x.dtype), norm.eps)


def _split_qkv(
    qkv: torch.Tensor, heads: int, norm: QKNorm, *, own_qk: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3*H*D) -> q, k, v each (B, H, L, D), q and k RMS-normed per head.

    ``own_qk`` norms copies of q and k, so that when v is copied on anyway (the double blocks
    concatenate it with the other stream) backward does not keep the whole fused output alive.
    """
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    if own_qk:
        q, k = q.contiguous(), k.contiguous()
    return _rms(norm.query_norm, q), _rms(norm.key_norm, k), v


def _rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
    return attention(apply_rope(q, *rope), apply_rope(k, *rope), v)


class SelfAttention(nn.Module):
    """One stream's projections: fused ``qkv``, per-head QK ``norm`` and output ``proj``."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text first)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(dim, 6))
            self.add_module(f"{stream}_norm1", _layer_norm(dim))
            self.add_module(f"{stream}_attn", SelfAttention(dim, heads, qkv_bias))
            self.add_module(f"{stream}_norm2", _layer_norm(dim))
            self.add_module(f"{stream}_mlp", _mlp(dim, mlp_hidden))

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod = self.img_mod(vec)
        txt_mod = self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv(self.img_attn, self.img_norm1(img), img_mod)
        txt_q, txt_k, txt_v = self._qkv(self.txt_attn, self.txt_norm1(txt), txt_mod)
        out = _rope_attention(
            torch.cat((txt_q, img_q), dim=2),
            torch.cat((txt_k, img_k), dim=2),
            torch.cat((txt_v, img_v), dim=2),
            rope,
        )
        n_txt = txt.shape[1]
        img = self._residual(img, out[:, n_txt:], img_mod, self.img_attn, self.img_norm2, self.img_mlp)
        txt = self._residual(txt, out[:, :n_txt], txt_mod, self.txt_attn, self.txt_norm2, self.txt_mlp)
        return img, txt

    @staticmethod
    def _qkv(attn: SelfAttention, normed: torch.Tensor, mod: tuple[torch.Tensor, ...]):
        shift, scale = mod[0], mod[1]
        return _split_qkv(attn.qkv(modulate(normed, shift, scale)), attn.heads, attn.norm, own_qk=True)

    @staticmethod
    def _residual(x, attn_out, mod, attn: SelfAttention, norm2: nn.Module, mlp: nn.Module) -> torch.Tensor:
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + gate1[:, None] * attn.proj(attn_out)
        return x + gate2[:, None] * mlp(modulate(norm2(x), shift2, scale2))


class SingleStreamBlock(nn.Module):
    """One stream over the joined sequence; attention and MLP run in parallel from one ``linear1``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.dim = dim
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)
        self.norm = QKNorm(dim // heads)
        self.pre_norm = _layer_norm(dim)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, 3)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: Rope) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            (3 * self.dim, self.mlp_hidden), dim=-1
        )
        q, k, v = _split_qkv(qkv, self.heads, self.norm)
        out = self.linear2(torch.cat((_rope_attention(q, k, v, rope), self.mlp_act(mlp)), dim=-1))
        return x + gate[:, None] * out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(dim)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Blocks:
    """The input projections and the block stacks, shared by :class:`FluxTransformer` and the ControlNet
    trunk that copies its front (both hold ``shape``, ``img_in``, ``time_in``, ``vector_in``,
    ``guidance_in``, ``txt_in``, ``double_blocks``, ``single_blocks`` and ``gradient_checkpointing``)."""

    shape: TransformerShape
    gradient_checkpointing: bool
    img_in: nn.Linear
    time_in: MLPEmbedder
    vector_in: MLPEmbedder
    guidance_in: nn.Module
    txt_in: nn.Linear
    double_blocks: nn.ModuleList
    single_blocks: nn.ModuleList

    def _inputs(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None,
        hint: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Rope]:
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        if hint is not None:
            img = img + hint.to(dtype)
        vec = self.time_in(_embed_time(timesteps, dtype))
        if self.shape.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux transformer embeds guidance: pass guidance=")
            vec = vec + self.guidance_in(_embed_time(guidance, dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        rope = rope_frequencies(torch.cat((txt_ids, img_ids), dim=-2), self.shape.axes_dim, self.shape.theta)
        return img, txt, vec, rope

    def run_blocks(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        hint: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The image stream after every block, double then single (image part only), with ``hint``
        added after ``img_in``: what a ControlNet trunk built like this transformer collects."""
        img, txt, vec, rope = self._inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance, hint)
        on = self.gradient_checkpointing
        features = []
        for block in self.double_blocks:
            img, txt = checkpointed(block, img, txt, vec, rope, enabled=on)
            features.append(img)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = checkpointed(block, x, vec, rope, enabled=on)
            features.append(x[:, txt.shape[1] :])
        return features


class FluxTransformer(Blocks, nn.Module):
    """Flux.1 dev/schnell backbone over packed tokens.

    ``forward(img, img_ids, txt, txt_ids, timesteps, y, guidance)``: ``img`` (B, N, in_channels) packed
    latents, ``txt`` (B, L, context_in_dim) T5 states, ``y`` (B, vec_in_dim) pooled CLIP, ``*_ids``
    (N, axes) or (B, N, axes) positions; ``timesteps``/``guidance`` (B,) in [0, 1] (scaled by 1000 here).
    """

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.shape = shape
        dim, heads = shape.hidden_size, shape.num_heads
        if dim % heads or sum(shape.axes_dim) != dim // heads:
            raise ValueError(f"axes_dim {shape.axes_dim} must sum to the head size {dim}/{heads}")
        mlp_hidden = int(dim * shape.mlp_ratio)
        self.img_in = nn.Linear(shape.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(shape.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if shape.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(shape.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, heads, mlp_hidden, shape.qkv_bias) for _ in range(shape.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, mlp_hidden) for _ in range(shape.depth_single)
        )
        self.final_layer = LastLayer(dim, shape.in_channels)
        self.gradient_checkpointing = False

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        controlnet_block_samples: Sequence[torch.Tensor] | None = None,
        controlnet_single_block_samples: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ControlNet residuals are added to the image stream after the double blocks and to the image
        part after the single blocks; with fewer residuals than blocks, block ``i`` takes residual
        ``i // ceil(blocks / residuals)`` (diffusers' interval rule)."""
        img, txt, vec, rope = self._inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        on = self.gradient_checkpointing
        for i, block in enumerate(self.double_blocks):
            img, txt = checkpointed(block, img, txt, vec, rope, enabled=on)
            if controlnet_block_samples:
                img = _add_control(img, controlnet_block_samples, i, len(self.double_blocks), 0)
        x = torch.cat((txt, img), dim=1)
        n_txt = txt.shape[1]
        for i, block in enumerate(self.single_blocks):
            x = checkpointed(block, x, vec, rope, enabled=on)
            if controlnet_single_block_samples:
                x = _add_control(x, controlnet_single_block_samples, i, len(self.single_blocks), n_txt)
        return self.final_layer(x[:, n_txt:], vec)


def _add_control(
    x: torch.Tensor, samples: Sequence[torch.Tensor], index: int, blocks: int, start: int
) -> torch.Tensor:
    """``x`` with block ``index``'s ControlNet residual added to the target image's tokens, which begin
    at ``start`` (after the text in the single stream; Kontext reference tokens follow and get none)."""
    residual = samples[index // math.ceil(blocks / len(samples))].to(x.dtype)
    end = start + residual.shape[1]
    return torch.cat((x[:, :start], x[:, start:end] + residual, x[:, end:]), dim=1)


def _embed_time(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # BFL and diffusers both embed 1000 * sigma with [cos, sin] and no frequency shift.
    t = t.reshape(-1).to(dtype) * 1000
    return timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0).to(dtype)
