"""The entry-point module: configs and hook implementations. It imports no torch, so discovery stays
fast; each factory imports its module when a job builds the component."""

from __future__ import annotations

import attrs

import diffcore
from diffcore.methods.config import DiffusionMethodConfig

#: the model types whose ``predict`` takes a ``residual`` (the side network's output); the method
#: checks a job's model against it at ``diffcore validate`` time
RESIDUAL_MODELS = ("residual-tiny",)


@attrs.define(kw_only=True)
class ResidualModelConfig:
    """A tiny class-conditional pixel-space denoiser that adds a residual to its hidden features."""

    channels: int = 3
    width: int = 16
    num_classes: int = 4


@attrs.define(kw_only=True)
class SideNetConfig(DiffusionMethodConfig):
    """The diffusion objective, predicted by the frozen model steered by a trained side network."""

    #: hidden channels of the side network
    width: int = 16
    #: channels of the control image
    control_channels: int = 3


@attrs.define(kw_only=True)
class ControlShapesConfig:
    """diffcore's synthetic shapes, each with its outline as the control image."""

    resolution: int = 16
    size: int = 256
    classes: list[str] | None = None
    seed: int = 0


def _model(config: ResidualModelConfig):
    from diffcore_controlnet_example.model import ResidualModel

    return ResidualModel(config)


def _method(config: SideNetConfig):
    from diffcore_controlnet_example.method import SideNetMethod

    return SideNetMethod(config)


def _dataset(config: ControlShapesConfig, build=None):
    from diffcore_controlnet_example.data import ControlShapes

    return ControlShapes(config, build)


@diffcore.hookimpl
def diffcore_register_models():
    return [
        diffcore.ModelSpec(
            name="residual-tiny",
            config=ResidualModelConfig,
            factory=_model,
            description="tiny class-conditional conv denoiser that takes a side network's residual",
        )
    ]


@diffcore.hookimpl
def diffcore_register_methods():
    return [
        diffcore.MethodSpec(
            name="sidenet",
            config=SideNetConfig,
            factory=_method,
            description="trains a ControlNet-like side network on a control image; the model stays frozen",
        )
    ]


@diffcore.hookimpl
def diffcore_register_datasets():
    return [
        diffcore.DatasetSpec(
            name="control-shapes",
            config=ControlShapesConfig,
            factory=_dataset,
            description="synthetic shapes with their outlines as control images",
        )
    ]
