"""The trainable part of one adapter on one layer ("branch"), one class per adapter kind.

A branch never owns the base layer; the adapted layer (:mod:`diffcore_lora.layers`) hands it the
layer, the input and the output so far. LoRA and DoRA act on activations (cheap: two thin matmuls);
LoKr and LoHa contribute a weight delta that is folded into one matmul with the base weight.
Kohya tensor names (``lora_down.weight``, ``lokr_w1``...) are the branch's own vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.errors import UserError
from diffcore.quantize.tensors import dense


def layer_geometry(layer: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out features, in features, kernel size) of a Linear ((), no kernel) or Conv2d layer."""
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels, tuple(layer.kernel_size)
    return layer.out_features, layer.in_features, ()


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into (m, n), m <= n, m * n == dim, as LyCORIS does for LoKr.

    A positive ``factor`` dividing ``dim`` is used as is; otherwise the most square pair whose smaller
    side does not exceed ``factor`` (-1: no limit). 128 -> (8, 16); 128, factor 4 -> (4, 32).
    """
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        cand = m + 1
        while dim % cand:
            cand += 1
        cand_n = dim // cand
        if cand + cand_n > m + n or cand > limit:
            break
        m, n = cand, cand_n
    return (m, n) if m <= n else (n, m)


class Branch(nn.Module):
    """What every adapter kind has: scale (alpha / rank), strength, dropouts, merge state."""

    kind = "base"
    weight_space = False
    #: the branch reads the base weight as a whole (a delta added to it, a row norm): a quantised
    #: base (model.quantize) is dequantised for it
    reads_weight = False

    def __init__(
        self,
        layer: nn.Module,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ):
        super().__init__()
        self.out_features, self.in_features, self.kernel = layer_geometry(layer)
        self.is_conv = bool(self.kernel)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # Plain attributes, not buffers: they are sampling-time settings, not trained state.
        self.strength = 1.0
        self.merged = False
        self._merge_cache: torch.Tensor | None = None

    def set_alpha(self, alpha: float) -> None:
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank

    def _kept(self) -> torch.Tensor | None:
        """Module dropout: None when off, else 1.0 (kept) or 0.0 (dropped this call) as a tensor that
        scales the update, so there is no host sync per layer and no graph break in a compiled block."""
        if not (self.training and self.module_dropout > 0):
            return None
        # drawn from torch's global RNG so a resumed run repeats the same draws
        return (torch.rand(()) >= self.module_dropout).float()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The scaled weight delta at strength 1 (for merging), in float32."""
        raise NotImplementedError

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """This branch's tensors under kohya/LyCORIS names, without ``alpha``."""
        raise NotImplementedError

    def load_kohya(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        own = self.kohya_tensors()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise UserError(
                f"adapter tensors do not match the {self.kind} layout: missing {missing}, unexpected {unexpected}",
                where=where,
                hint="was this file saved with another adapter type or rank?",
            )
        for name, value in tensors.items():
            param = own[name]
            if tuple(param.shape) != tuple(value.shape):
                raise UserError(
                    f"{name} has shape {tuple(value.shape)}, the attached adapter expects {tuple(param.shape)}",
                    where=where,
                    hint=self._mismatch_hint(tuple(value.shape), tuple(param.shape)),
                )
        with torch.no_grad():
            for name, value in tensors.items():
                param = self._param_of(name)
                param.copy_(value.reshape(param.shape).to(device=param.device, dtype=param.dtype))

    def _mismatch_hint(self, found: tuple[int, ...], expected: tuple[int, ...]) -> str:
        """Say which setting differs: the rank, when only rank-sized dimensions differ; otherwise the
        layer's own width, which no adapter setting can change."""
        differing = [e for f, e in zip(found, expected) if f != e] if len(found) == len(expected) else [None]
        if differing and all(e == self.rank for e in differing):
            return "set the adapter's rank (and factor) to those the file was trained with"
        return "the layer's width differs: the file was trained for another architecture or model size"

    def _param_of(self, kohya_name: str) -> nn.Parameter:
        return getattr(self, kohya_name.removesuffix(".weight").replace(".", "_"))


def _new(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=dtype or like.dtype))


class LoraBranch(Branch):
    """LoRA: out += up(down(dropout(x))) * alpha / rank; Linear or Conv2d (down carries the kernel)."""

    kind = "lora"

    def __init__(
        self, layer: nn.Module, rank: int, alpha: float, *, init: str = "default", dtype=None, **drops
    ):
        super().__init__(layer, rank, alpha, **drops)
        w = layer.weight
        self.lora_down = _new((rank, self.in_features, *self.kernel), w, dtype)
        self.lora_up = _new((self.out_features, rank, *(1,) * len(self.kernel)), w, dtype)
        if self.is_conv:
            self.conv_args = (layer.stride, layer.padding, layer.dilation)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_down, std=1.0 / rank)
            else:  # PEFT's default (Kaiming-uniform, a=sqrt(5)); up is zero so training starts at the base model
                nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
            nn.init.zeros_(self.lora_up)

    def _low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """down(dropout(x)) with rank dropout, in the adapter's dtype."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        x = x.to(self.lora_down.dtype)
        if self.is_conv:
            h = F.conv2d(x, self.lora_down, None, *self.conv_args)
        else:
            h = F.linear(x, self.lora_down)
        if self.rank_dropout and self.training:
            # One keep-mask per sample over the rank axis, rescaled so the expectation is unchanged.
            shape = (
                (h.shape[0], self.rank, 1, 1)
                if self.is_conv
                else (h.shape[0], *(1,) * (h.dim() - 2), self.rank)
            )
            keep = (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
            h = h * keep / (1.0 - self.rank_dropout)
        return h

    def forward(
        self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """``out`` (the base layer's output for ``x``) plus this branch's update."""
        kept = self._kept()
        h = self._low_rank(x).to(out.dtype)
        if kept is not None:
            h = h * kept.to(h.dtype)
        up = self.lora_up.to(out.dtype)
        gain = self.scale * self.strength
        if self.is_conv:
            return torch.add(out, F.conv2d(h, up), alpha=gain)
        # One GEMM adds the scaled update into the base output (no separate scale and add kernels).
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.rank), up.t(), alpha=gain)
        return flat.view(out.shape)

    def lora_weight(self) -> torch.Tensor:
        """up @ down as a weight-shaped tensor (unscaled)."""
        w = self.lora_up.flatten(1) @ self.lora_down.flatten(1)
        return w.view(self.weight_shape)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.lora_weight().float() * self.scale

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down, "lora_up.weight": self.lora_up}


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    return weight.flatten(1).norm(dim=1)


class DoraBranch(LoraBranch):
    """DoRA: W' = m * (W + s*up@down) / ||W + s*up@down|| (row norm, not back-propagated), as PEFT."""

    kind = "dora"
    reads_weight = True

    def __init__(
        self, layer: nn.Module, rank: int, alpha: float, *, init: str = "default", dtype=None, **drops
    ):
        super().__init__(layer, rank, alpha, init=init, dtype=dtype, **drops)
        with torch.no_grad():
            w = dense(layer.weight)
            norm = _row_norm(w + self.scale * self.lora_weight().to(w.dtype))
        self.magnitude = nn.Parameter(norm.to(dtype or w.dtype))

    def _view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # per output channel: the last axis of a Linear output, axis 1 of a Conv2d output
        return v.view(-1, 1, 1) if self.is_conv else v

    def forward(
        self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        kept = self._kept()
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
            base = layer._base_op(x, weight, None)
        elif layer.bias is not None:
            base = out - (layer.bias.view(-1, 1, 1) if self.is_conv else layer.bias)
        else:
            base = out
        xd = x.to(self.lora_down.dtype)
        if self.is_conv:
            lora = F.conv2d(F.conv2d(xd, self.lora_down, None, *self.conv_args), self.lora_up)
        else:
            lora = F.linear(F.linear(xd, self.lora_down), self.lora_up)
        w = weight.to(x.dtype)
        norm = _row_norm(w + self.scale * self.lora_weight().detach().to(w.dtype)).detach()
        ratio = self._view(self.magnitude.to(x.dtype) / norm, out)
        term = (ratio - 1) * base + ratio * lora.to(out.dtype) * self.scale
        if kept is not None:
            term = term * kept.to(term.dtype)
        return out + term if self.strength == 1.0 else out + self.strength * term

    def merged_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', ||W + s dW||) in float32."""
        full = weight.float() + self.lora_weight().float() * self.scale
        norm = _row_norm(full)
        shape = (-1,) + (1,) * (full.dim() - 1)
        return full * (self.magnitude.float() / norm).view(shape), norm

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.merged_weight(weight)[0] - weight.float()

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        # LyCORIS/kohya keep the magnitude on the output axis, shaped to broadcast over the weight.
        out = super().kohya_tensors()
        out["dora_scale"] = self.magnitude.view(-1, *(1,) * (1 + len(self.kernel)))
        return out

    def _mismatch_hint(self, found: tuple[int, ...], expected: tuple[int, ...]) -> str:
        """Say which setting differs: the rank, when only rank-sized dimensions differ; otherwise the
        layer's own width, which no adapter setting can change."""
        differing = [e for f, e in zip(found, expected) if f != e] if len(found) == len(expected) else [None]
        if differing and all(e == self.rank for e in differing):
            return "set the adapter's rank (and factor) to those the file was trained with"
        return "the layer's width differs: the file was trained for another architecture or model size"

    def _param_of(self, kohya_name: str) -> nn.Parameter:
        return self.magnitude if kohya_name == "dora_scale" else super()._param_of(kohya_name)

    def load_kohya(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        tensors = dict(tensors)
        if "dora_scale" in tensors:
            scale = tensors["dora_scale"]
            if scale.numel() != self.out_features:
                raise UserError(
                    f"dora_scale has shape {tuple(scale.shape)}; only the output-axis layout (out, 1) is supported",
                    where=where,
                )
            tensors["dora_scale"] = scale.reshape(self.out_features, *(1,) * (1 + len(self.kernel)))
        super().load_kohya(tensors, where)


class _WeightSpaceBranch(Branch):
    """A branch whose update is a weight delta, added to the base weight before the one matmul."""

    weight_space = True
    reads_weight = True

    def build(self) -> torch.Tensor:
        """The unscaled delta, weight-shaped."""
        raise NotImplementedError

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` plus this branch's delta at its strength."""
        kept = self._kept()
        delta = self.build()
        if kept is not None:
            delta = delta * kept.to(delta.dtype)
        if self.rank_dropout and self.training:
            # LyCORIS drops whole output rows of the delta.
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            delta = delta * keep.view(-1, *(1,) * (delta.dim() - 1))
        return weight + delta.to(weight.dtype) * (self.scale * self.strength)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.build().float() * self.scale


class LokrBranch(_WeightSpaceBranch):
    """LoKr: dW = kron(w1, w2) * scale, each factor full or low-rank, conv with an optional Tucker core.

    Both factors full means scale 1 (LyCORIS and ComfyUI agree; the file's alpha is then the rank).
    """

    kind = "lokr"

    def __init__(
        self,
        layer: nn.Module,
        rank: int,
        alpha: float,
        *,
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
        use_tucker: bool = False,
        dtype=None,
        **drops,
    ):
        super().__init__(layer, rank, alpha, **drops)
        w = layer.weight
        out_l, out_k = factorization(self.out_features, factor)
        in_m, in_n = factorization(self.in_features, factor)
        kernel_len = math.prod(self.kernel) if self.kernel else 1
        self.use_tucker = use_tucker and self.is_conv and any(k != 1 for k in self.kernel)
        self.full_w1 = not (decompose_both and rank < max(out_l, in_m) / 2 and not full_matrix)
        self.full_w2 = full_matrix or rank >= max(out_k, in_n) / 2
        if self.full_w1:
            self.lokr_w1 = _new((out_l, in_m), w, dtype)
        else:
            self.lokr_w1_a = _new((out_l, rank), w, dtype)
            self.lokr_w1_b = _new((rank, in_m), w, dtype)
        if self.full_w2:
            self.lokr_w2 = _new((out_k, in_n, *self.kernel), w, dtype)
        elif self.use_tucker:
            self.lokr_t2 = _new((rank, rank, *self.kernel), w, dtype)
            self.lokr_w2_a = _new((rank, out_k), w, dtype)
            self.lokr_w2_b = _new((rank, in_n), w, dtype)
        else:
            self.lokr_w2_a = _new((out_k, rank), w, dtype)
            self.lokr_w2_b = _new((rank, in_n * kernel_len), w, dtype)
        self._fix_scale()
        with torch.no_grad():  # LyCORIS' init: the delta starts at zero through w2
            for name, p in self.named_parameters():
                if name in ("lokr_w2", "lokr_w2_b"):
                    nn.init.zeros_(p)
                else:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _fix_scale(self) -> None:
        if self.full_w1 and self.full_w2:
            self.alpha, self.scale = float(self.rank), 1.0

    def set_alpha(self, alpha: float) -> None:
        super().set_alpha(alpha)
        self._fix_scale()

    @classmethod
    def from_tensors(
        cls, layer: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None
    ) -> LokrBranch:
        """A branch shaped like the tensors of a LoKr file (rank read from the factored side)."""
        rank = None
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in tensors:
                rank = tensors[name].shape[0]
                break
        branch = cls.__new__(cls)
        Branch.__init__(branch, layer, rank or 1, alpha if (alpha and rank) else float(rank or 1))
        branch.full_w1 = "lokr_w1" in tensors
        branch.full_w2 = "lokr_w2" in tensors
        branch.use_tucker = "lokr_t2" in tensors
        w = layer.weight
        for name, value in tensors.items():
            setattr(branch, name, nn.Parameter(torch.empty(value.shape, device=w.device, dtype=w.dtype)))
        branch._fix_scale()
        return branch

    def build(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b
        if self.full_w2:
            w2 = self.lokr_w2
        elif self.use_tucker:
            w2 = torch.einsum("ij...,ip,jq->pq...", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).view(self.lokr_w2_a.shape[0], -1, *self.kernel)
        w1 = w1.view(*w1.shape, *(1,) * len(self.kernel))
        return torch.kron(w1, w2.contiguous())

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return {n: getattr(self, n) for n in names if n in self._parameters}


class LohaBranch(_WeightSpaceBranch):
    """LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * scale (conv kernels flattened into w*_b)."""

    kind = "loha"

    def __init__(self, layer: nn.Module, rank: int, alpha: float, *, dtype=None, **drops):
        super().__init__(layer, rank, alpha, **drops)
        w = layer.weight
        flat_in = self.in_features * (math.prod(self.kernel) if self.kernel else 1)
        self.hada_w1_a = _new((self.out_features, rank), w, dtype)
        self.hada_w1_b = _new((rank, flat_in), w, dtype)
        self.hada_w2_a = _new((self.out_features, rank), w, dtype)
        self.hada_w2_b = _new((rank, flat_in), w, dtype)
        with torch.no_grad():  # LyCORIS' init: w2_a zero so the delta starts at zero
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)
            nn.init.normal_(self.hada_w2_b, std=1.0)

    def build(self) -> torch.Tensor:
        delta = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return delta.view(self.weight_shape)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


BRANCHES: dict[str, type[Branch]] = {
    "lora": LoraBranch,
    "dora": DoraBranch,
    "lokr": LokrBranch,
    "loha": LohaBranch,
}
