"""Flux.1's text conditioning: T5 encoder states for the sequence, CLIP-L's pooled output for the vector.

The encoders come from local folders in the Hugging Face layout (a diffusers pipeline's text_encoder/,
text_encoder_2/) or from single safetensors files with Hugging Face key names (ComfyUI's clip_l and
t5xxl files), whose sizes are read from the tensor shapes. Tokenizers come from local folders
(tokenizer/, tokenizer_2/). Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffcore.errors import UserError


class FluxTextEncoders:
    """CLIP-L (pooled) and T5 (sequence) with their tokenizers; ``encode(captions)`` -> (txt, pooled)."""

    def __init__(self, clip: nn.Module, t5: nn.Module, clip_tokenizer, t5_tokenizer, max_length: int):
        self.clip = clip
        self.t5 = t5
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        clip_len = min(self.clip_tokenizer.model_max_length, self.clip.config.max_position_embeddings)
        clip_ids = self._ids(self.clip_tokenizer, captions, clip_len, self.clip)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self._ids(self.t5_tokenizer, captions, self.max_length, self.t5)
        txt = self.t5(t5_ids, output_hidden_states=False)[0]
        return txt, pooled

    @staticmethod
    def _ids(tokenizer, captions: list[str], length: int, encoder: nn.Module) -> torch.Tensor:
        # Fixed-length padding without an attention mask, as BFL and diffusers encode Flux prompts.
        ids = tokenizer(
            list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(next(encoder.parameters()).device)


def _folder(path: str | Path | None, what: str, option: str, marker: str) -> Path:
    if path is None:
        raise UserError(
            f"no {what} given",
            where=f"$.model.{option}",
            hint=f"set {option}, or pretrained to a diffusers Flux folder",
        )
    folder = Path(path)
    if not (folder / marker).exists():
        raise UserError(
            f"{what} not found: expected a folder in the Hugging Face layout",
            where=str(folder),
            hint=f"point {option} at a local folder (e.g. the pipeline's {option}/); nothing is downloaded",
        )
    return folder


def load_text_encoders(
    clip_path: str | Path | None,
    t5_path: str | Path | None,
    clip_tokenizer_path: str | Path | None,
    t5_tokenizer_path: str | Path | None,
    *,
    max_length: int,
    dtype: torch.dtype,
) -> FluxTextEncoders:
    """Load CLIP-L and T5 from local folders (weights streamed from safetensors, no random init)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    def model(cls, path, option):
        if path is not None and Path(path).is_file():
            return load_single_file(cls.__name__, Path(path), dtype)
        folder = _folder(path, f"{option.replace('_', ' ')} ({cls.__name__})", option, "config.json")
        try:
            return cls.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
        except OSError as exc:
            raise UserError(f"cannot load {cls.__name__}: {exc}", where=str(folder)) from None

    def tokenizer(path, option):
        folder = _folder(path, option.replace("_", " "), option, "tokenizer_config.json")
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer: {exc}", where=str(folder)) from None

    return FluxTextEncoders(
        model(CLIPTextModel, clip_path, "text_encoder"),
        model(T5EncoderModel, t5_path, "text_encoder_2"),
        tokenizer(clip_tokenizer_path, "tokenizer"),
        tokenizer(t5_tokenizer_path, "tokenizer_2"),
        max_length,
    )


def _count(keys: list[str], prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def load_single_file(kind: str, path: Path, dtype: torch.dtype) -> nn.Module:
    """CLIPTextModel or T5EncoderModel from one safetensors file in HF key layout, sizes from its shapes;
    built on the meta device and filled tensor by tensor."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffcore.weights import Checkpoint, empty_weights, load_into

    checkpoint = Checkpoint(path)
    keys = checkpoint.keys()
    where = str(path)

    def shape(key: str) -> tuple[int, ...]:
        if key not in checkpoint:
            raise UserError(f"not a {kind} file in the Hugging Face layout (no {key})", where=where)
        return tuple(checkpoint.get(key).shape)

    if kind == "CLIPTextModel":
        # Files name the weights "text_model.<path>" (transformers 4 and ComfyUI) or "<path>".
        prefix = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
        vocab, hidden = shape(prefix + "embeddings.token_embedding.weight")
        config = CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
            num_hidden_layers=_count(keys, prefix + "encoder.layers."),
            num_attention_heads=max(1, hidden // 64),  # CLIP's head size is 64
            max_position_embeddings=shape(prefix + "embeddings.position_embedding.weight")[0],
            hidden_act="quick_gelu",
            eos_token_id=2,  # the published CLIP-L config: pool at the highest id (end of text)
        )
        with empty_weights():
            model = CLIPTextModel(config)
        own = set(model.state_dict())

        def rename(key: str) -> str | None:
            name = key[len(prefix) :] if key.startswith(prefix) else key
            if name.endswith("position_ids") or (name not in own and not key.startswith(prefix)):
                return None  # text_projection / logit_scale belong to other CLIP heads
            return name if name in own else "text_model." + name

        load_into(model, checkpoint.items(), where=where, dtype=dtype, rename=rename)
        for name, _ in list(model.named_buffers()):
            if name.endswith("position_ids"):  # non-persistent: never in a file
                owner = model.get_submodule(name.rpartition(".")[0])
                owner.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))
        return model.eval()

    vocab, d_model = shape("shared.weight")
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in checkpoint
    ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    config = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_ff=shape(ff_key)[0],
        d_kv=shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        num_heads=heads,
        num_layers=_count(keys, "encoder.block."),
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with empty_weights():
        model = T5EncoderModel(config)

    def rename_t5(key: str) -> str | None:
        return None if key == "encoder.embed_tokens.weight" else key  # tied to shared.weight

    load_into(model, checkpoint.items(), where=where, dtype=dtype, rename=rename_t5)
    model.set_input_embeddings(model.shared)  # filling shared.weight replaced the tied parameter
    return model.eval()
