"""Where a text encoder's weights, config and tokenizer are: a diffusers pipeline folder, a component
folder, or a single safetensors file holding the tower under some key prefix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import UserError
from diffcore.locate import locate as find
from diffcore.text_encoders.config import EncoderConfig
from diffcore.weights import Checkpoint


@attrs.frozen
class Source:
    """The tensors of one text encoder: ``checkpoint`` keys under ``prefix``, with the folder's
    ``config.json`` when there is one (None for single files: sizes come from the shapes)."""

    checkpoint: Checkpoint
    prefix: str
    config: dict[str, Any] | None
    folder: Path | None
    where: str

    def keys(self) -> list[str]:
        """Tower keys without the prefix."""
        n = len(self.prefix)
        return [k[n:] for k in self.checkpoint.keys() if k.startswith(self.prefix)]

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self.checkpoint

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self:
            raise UserError(
                f"not the expected text encoder: no tensor {self.prefix + key}",
                where=self.where,
                hint="is this file for this text encoder family?",
            )
        return tuple(self.checkpoint.get(self.prefix + key).shape)

    def items(self):
        return self.checkpoint.items(self.prefix)


def locate(config: EncoderConfig, family: str, prefixes: Sequence[str], anchors: Sequence[str]) -> Source:
    """The weights named by ``config``. A tower is found under the first of ``config.prefix`` (if set)
    or ``prefixes`` at which one of the ``anchors`` keys exists."""
    if config.pretrained is None:
        raise UserError(
            f"no weights given for the {family} text encoder",
            where="pretrained",
            hint="set pretrained to a diffusers folder or a .safetensors file",
        )
    found = find(config.pretrained, config.subfolder or "text_encoder", what=f"a {family} text encoder")
    checkpoint = found.checkpoint()
    data = found.config
    if data is not None:
        # composite configs (CLIPConfig, Mistral3Config) nest the text model's own fields
        data = data.get("text_config", data)
    tried = [config.prefix] if config.prefix is not None else list(prefixes)
    keys = set(checkpoint.keys())
    for prefix in tried:
        if any(prefix + anchor in keys for anchor in anchors):
            where = found.where + (f" ({prefix}*)" if prefix else "")
            return Source(checkpoint, prefix, data, None if found.is_file else found.path, where)
    shown = ", ".join(repr(p) for p in tried)
    raise UserError(
        f"no {family} text encoder in these weights (looked for {anchors[0]!r} under {shown})",
        where=found.where,
        hint="is this the right file? set prefix to where the encoder's keys start",
    )


def tokenizer_folder(config: EncoderConfig, family: str) -> Path:
    """``config.tokenizer``; else ``tokenizer<suffix>`` of the pipeline (``text_encoder_2`` ->
    ``tokenizer_2``), beside a component folder, or the encoder folder itself."""
    if config.tokenizer is not None:
        folder = Path(config.tokenizer)
        if not folder.is_dir():
            raise UserError(
                "tokenizer folder not found", where=str(folder), hint="point tokenizer at a folder"
            )
        return folder
    candidates: list[Path] = []
    if config.pretrained is not None:
        found = find(config.pretrained, config.subfolder or "text_encoder", what=f"a {family} text encoder")
        if found.pipeline is not None:
            candidates.append(found.pipeline / f"tokenizer{found.component.removeprefix('text_encoder')}")
        elif not found.is_file:
            suffix = found.path.name.removeprefix("text_encoder")
            if suffix != found.path.name:
                candidates.append(found.path.parent / f"tokenizer{suffix}")
            candidates.append(found.path)  # LLM repositories keep the tokenizer beside the weights
    for folder in candidates:
        if (folder / "tokenizer_config.json").exists():
            return folder
    raise UserError(
        f"no tokenizer found for the {family} text encoder",
        where=str(config.pretrained) if config.pretrained else "tokenizer",
        hint="set tokenizer to a folder holding the tokenizer files (e.g. a pipeline's tokenizer/)",
    )


def load_tokenizer(folder: str | Path) -> Any:
    """A transformers tokenizer from a local folder (never downloaded)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            "tokenizer folder not found", where=str(folder), hint="point it at a tokenizer folder"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer: {exc}", where=str(folder)) from None
