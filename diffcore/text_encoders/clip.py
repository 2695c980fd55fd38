"""CLIP text towers (CLIP-L, OpenCLIP bigG/H) as transformers ``CLIPTextModel(WithProjection)``.

Weights come in the HF layout (with or without the ``text_model.`` level: ComfyUI's clip_l, SD1 files,
diffusers folders) or in the OpenCLIP layout (SDXL's and SD2's single files), detected from the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffcore.errors import UserError
from diffcore.text_encoders.config import ClipConfig
from diffcore.text_encoders.encoder import Encoded, TextEncoder
from diffcore.text_encoders.openclip import is_openclip, openclip_layers, openclip_to_hf
from diffcore.text_encoders.sources import Source
from diffcore.weights import empty_weights, load_into

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

# Token ids of the published configs: eos 2 selects transformers' legacy pooling at the highest id
# (the end-of-text token), which is what every Stable Diffusion checkpoint was trained with.
_BASE: dict[str, Any] = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1
)
PRESETS: dict[str, dict[str, Any]] = {
    "clip-l": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768,
    ),
    "openclip-bigg": dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280,
    ),
}  # fmt: skip
PREFIXES: dict[str, tuple[str, ...]] = {
    "clip-l": ("", "conditioner.embedders.0.transformer.", "cond_stage_model.transformer.",
               "text_encoders.clip_l.transformer."),
    "openclip-bigg": ("", "conditioner.embedders.1.model.", "text_encoders.clip_g.transformer."),
}  # fmt: skip
ANCHORS = (
    "text_model.embeddings.token_embedding.weight",
    "embeddings.token_embedding.weight",
    "token_embedding.weight",
)


def _heads(hidden: int) -> int:
    return max(1, hidden // 64)  # every CLIP text tower uses 64-wide heads


def _shape(source: Source, family: str) -> dict[str, Any]:
    keys = source.keys()
    if is_openclip(keys):
        tok = source.shape("token_embedding.weight")
        shape = dict(
            vocab_size=tok[0],
            hidden_size=tok[1],
            max_position_embeddings=source.shape("positional_embedding")[0],
            intermediate_size=source.shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
            num_hidden_layers=openclip_layers(keys),
            num_attention_heads=_heads(tok[1]),
            hidden_act="gelu",  # OpenCLIP towers use exact GELU
        )
        if "text_projection" in source:
            shape["projection_dim"] = source.shape("text_projection")[1]  # stored (hidden, proj)
        return shape
    level = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
    tok = source.shape(level + "embeddings.token_embedding.weight")
    inner = [k[len(level) :] for k in keys if k.startswith(level)]
    layers = {k.split(".")[2] for k in inner if k.startswith("encoder.layers.")}
    shape = dict(
        vocab_size=tok[0],
        hidden_size=tok[1],
        max_position_embeddings=source.shape(level + "embeddings.position_embedding.weight")[0],
        intermediate_size=source.shape(level + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(layers),
        num_attention_heads=_heads(tok[1]),
    )
    if "text_projection.weight" in source:
        shape["projection_dim"] = source.shape("text_projection.weight")[0]
    return shape


def clip_config(family: str, options: dict[str, Any], source: Source | None = None) -> Any:
    """The transformers config: ``config.json`` if the folder has one, else the family preset updated
    with the sizes read from the tensor shapes; ``options`` win over both."""
    from transformers import CLIPTextConfig

    if source is None:
        fields = {**_BASE, **PRESETS[family]}
    elif source.config is not None:
        fields = {**_BASE, **source.config}
    else:
        fields = {**_BASE, **PRESETS[family], **_shape(source, family)}
    fields.update(options)
    width, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
    if isinstance(width, int) and isinstance(heads, int) and (heads < 1 or width % heads):
        # a single file does not store its head count: 64-wide heads are assumed
        raise UserError(
            f"a {width}-wide CLIP tower does not split into {heads} attention heads",
            where=source.where if source is not None else "num_attention_heads",
            hint="set num_attention_heads among the text encoder's options to a count dividing its width",
        )
    return CLIPTextConfig(**fields)


def _model_class(projection: bool) -> type[nn.Module]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if projection else CLIPTextModel


def repair_position_ids(model: nn.Module) -> nn.Module:
    """Set every CLIP ``position_ids`` buffer to ``0..L-1`` (int64). Files either lack it (it is not
    persistent) or carry it as float or int64 with drifted values (old SD checkpoints); it is never
    read from the file."""
    for name, buf in list(model.named_buffers()):
        if name.endswith("position_ids"):
            owner = model.get_submodule(name.rpartition(".")[0])
            device = "cpu" if buf.is_meta else buf.device
            owner.position_ids = torch.arange(buf.shape[-1], device=device).expand(1, -1).clone()
    return model


def renamer(model: nn.Module, projection: bool):
    """Map HF CLIP key names (with or without ``text_model.``) onto ``model``'s own, whichever way the
    installed transformers nests the text transformer; file ``position_ids`` and, without a
    projection head, ``text_projection``/``logit_scale`` are dropped."""
    own = set(model.state_dict())

    def rename(key: str) -> str | None:
        if key.endswith("position_ids"):
            return None
        if not projection and key.startswith(("text_projection", "logit_scale")):
            return None
        for candidate in (key, key.removeprefix("text_model."), "text_model." + key):
            if candidate in own:
                return candidate
        return key

    return rename


def canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors under the published key names (``text_model.*``, ``text_projection.weight``)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value.detach()
    return out


def random_clip(family: str, config: ClipConfig) -> nn.Module:
    """A randomly initialised tower from the family preset and ``config.options`` (tests, from scratch)."""
    return repair_position_ids(_model_class(config.projection)(clip_config(family, config.options))).eval()


def load_clip(source: Source, family: str, config: ClipConfig, dtype: torch.dtype) -> nn.Module:
    """Build on the meta device and stream the weights in ``dtype``."""
    hf_config = clip_config(family, config.options, source)
    if config.projection and not any(
        k.startswith(("text_projection", "text_model.text_projection")) for k in source.keys()
    ):
        raise UserError(
            "this text encoder has no projection (text_projection) but one was asked for",
            where=source.where,
            hint="set projection: false, or use the file holding the projection",
        )
    with empty_weights():
        model = _model_class(config.projection)(hf_config)
    if is_openclip(source.keys()):
        items = openclip_to_hf(source.items(), hf_config.num_hidden_layers)
    else:
        items = source.items()
    load_into(model, items, where=source.where, dtype=dtype, rename=renamer(model, config.projection))
    return repair_position_ids(model).eval()


def hidden_layer(out: Any, layer: str | int) -> torch.Tensor:
    """``"last"``: the final-norm output; ``"penultimate"``: the second to last layer's output without
    the final norm (SDXL, SD2); an int: that entry of ``hidden_states`` (0 = embeddings)."""
    if layer == "last":
        return out.last_hidden_state
    if layer == "penultimate":
        return out.hidden_states[-2]
    if isinstance(layer, int):
        return out.hidden_states[layer]
    raise UserError(
        f"unknown hidden layer {layer!r}", where="layer", hint="use last, penultimate or an index"
    )


class ClipEncoder(TextEncoder):
    """CLIP: ``hidden`` from the chosen layer, ``pooled`` the projected (``text_embeds``) or plain
    (``pooler_output``) end-of-text state."""

    config: ClipConfig
    model: CLIPTextModel | CLIPTextModelWithProjection

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        length = min(self.config.max_length, self.model.config.max_position_embeddings)
        return self._padded(captions, length)

    def run(self, ids: torch.Tensor, mask: torch.Tensor) -> Encoded:
        # no attention mask: SD and Flux condition on the padded sequence as CLIP saw it in training
        out = self.model(ids.to(self.device), output_hidden_states=self.config.layer != "last")
        pooled = out.text_embeds if self.config.projection else out.pooler_output
        return Encoded(hidden_layer(out, self.config.layer), pooled, mask)
