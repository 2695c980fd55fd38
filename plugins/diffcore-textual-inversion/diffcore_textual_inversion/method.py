"""The ``textual_inversion`` method: placeholder tokens added to the model's tokenizers, their vectors
initialised from a word and trained with the default objective while everything else stays frozen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from diffcore import Problem, UserError
from diffcore.context import TrainContext
from diffcore.method import Logs
from diffcore.methods.diffusion import DiffusionMethod
from diffcore.model import DiffusionModel, TokenTable
from diffcore_textual_inversion.config import TextualInversionConfig
from diffcore_textual_inversion.embeddings import SINGLE_KEY, NewTokens, Splice

WHERE = "$.method"
#: the module's name: the vectors are exported as ``embeddings.safetensors``
MODULE = "embeddings"


class TextualInversionMethod(DiffusionMethod):
    def __init__(self, config: TextualInversionConfig):
        super().__init__(config)
        self.config: TextualInversionConfig = config
        self.splices: dict[str, Splice] = {}

    @property
    def tokens(self) -> list[str]:
        """The tokens added to each tokenizer: the placeholder, then ``<placeholder>_1`` ... (the
        names diffusers' ``load_textual_inversion`` gives a multi-vector embedding)."""
        p = self.config.placeholder_token
        return [p] + [f"{p}_{i}" for i in range(1, self.config.num_vectors)]

    def expand(self, caption: str) -> str:
        """``caption`` with the placeholder written out as all its tokens (multi-vector)."""
        if self.config.num_vectors == 1:
            return caption
        return caption.replace(self.config.placeholder_token, " ".join(self.tokens))

    def validate(self, job: Any) -> list[Problem]:
        c, problems = self.config, []
        if not c.placeholder_token.strip() or any(ch.isspace() for ch in c.placeholder_token):
            problems.append(Problem(f"{WHERE}.placeholder_token", f"must be one word without spaces, got {c.placeholder_token!r}"))
        if not c.initializer_token.strip():
            problems.append(Problem(f"{WHERE}.initializer_token", "must name a word the tokenizers know, e.g. cat"))
        if c.num_vectors < 1:
            problems.append(Problem(f"{WHERE}.num_vectors", f"must be at least 1, got {c.num_vectors}"))
        # a feature cache holds the text encoders' output for each caption, computed before the new
        # tokens exist: training from it would never read the vectors
        if getattr(job.data.config, "cache_dir", None):
            problems.append(
                Problem(
                    "$.data.cache_dir",
                    "textual inversion trains what the text encoders compute, which a cache would freeze; "
                    "remove cache_dir",
                )
            )
        return problems

    def modules(self, model: DiffusionModel) -> dict[str, nn.Module]:
        tables = model.token_tables()
        if not tables:
            raise UserError(
                f"{model.architecture or type(model).__name__} exposes no token embeddings to extend",
                where="$.model.type",
                hint="textual inversion needs a model with text encoders and tokenizers loaded (e.g. sd15, sd21, sdxl)",
            )
        chosen = list(self.config.tables) if self.config.tables is not None else list(tables)
        unknown = [name for name in chosen if name not in tables]
        if unknown or not chosen:
            raise UserError(
                f"unknown token tables {unknown}" if unknown else "no token table chosen",
                where=f"{WHERE}.tables",
                hint=f"this model has: {', '.join(tables)}",
            )
        for name in chosen:
            self._check_new(name, tables[name])
        vectors = {name: self._initial_vectors(name, tables[name]) for name in chosen}
        keys = {name: SINGLE_KEY if len(tables) == 1 else name for name in chosen}
        module = NewTokens({keys[name]: v for name, v in vectors.items()})
        for name in chosen:
            table = tables[name]
            table.tokenizer.add_tokens(self.tokens)
            ids = table.tokenizer.convert_tokens_to_ids(self.tokens)
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise RuntimeError(f"the {name} tokenizer gave the new tokens non-consecutive ids {ids}")
            self.splices[name] = Splice(module, keys[name], ids[0], table.embedding)
        return {MODULE: module}

    def _check_new(self, name: str, table: TokenTable) -> None:
        vocab = table.tokenizer.get_vocab()
        for token in self.tokens:
            if token in vocab:
                raise UserError(
                    f"the placeholder token {token!r} already exists in the {name} tokenizer",
                    where=f"{WHERE}.placeholder_token",
                    hint="choose a token no tokenizer knows, e.g. <my-concept>",
                )

    def _initial_vectors(self, name: str, table: TokenTable) -> torch.Tensor:
        ids = table.tokenizer(self.config.initializer_token, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(
                f"{self.config.initializer_token!r} gives no tokens in the {name} tokenizer",
                where=f"{WHERE}.initializer_token",
                hint="use a plain word such as cat",
            )
        rows = table.embedding.weight.detach()[torch.tensor(ids, device=table.embedding.weight.device)].float().cpu()
        if self.config.num_vectors == 1:
            return rows.mean(0, keepdim=True)  # a word of several tokens starts at their mean
        return rows[[i % len(ids) for i in range(self.config.num_vectors)]]

    def setup(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        if ctx.adapter_params is not None:
            return list(ctx.adapter_params)  # an adapter trains beside the vectors (pivotal tuning)
        ctx.model.backbone.requires_grad_(False)
        return []

    def loss(self, ctx: TrainContext, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        if self.config.num_vectors > 1 and "captions" in batch:
            batch = {**batch, "captions": [self.expand(c) for c in batch["captions"]]}
        return self.denoising_loss(ctx, batch), {}
