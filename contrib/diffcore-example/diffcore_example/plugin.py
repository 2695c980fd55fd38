"""The entry-point module: hook implementations returning records. No torch import here, so
``diffcore plugins`` and ``diffcore --help`` stay fast; the factories import torch when called."""

from __future__ import annotations

import attrs

import diffcore


@attrs.define(kw_only=True)
class TinyModelConfig:
    channels: int = 3
    width: int = 32
    num_classes: int = 4
    prediction_type: str = "eps"
    pretrained: str | None = None


@attrs.define(kw_only=True)
class LossHistoryConfig:
    filename: str = "loss_history.txt"


def _build_model(config: TinyModelConfig):
    from diffcore_example.model import TinyModel

    return TinyModel(config)


def _build_callback(config: LossHistoryConfig):
    from diffcore_example.callback import LossHistory

    return LossHistory(config)


@diffcore.hookimpl
def diffcore_register_models():
    return [diffcore.ModelSpec(name="example-tiny", config=TinyModelConfig, factory=_build_model,
                               description="tiny class-conditional conv denoiser (pixel space)")]


@diffcore.hookimpl
def diffcore_register_callbacks():
    return [diffcore.CallbackSpec(name="loss-history", config=LossHistoryConfig, factory=_build_callback,
                                  description="writes logged losses to a text file")]
