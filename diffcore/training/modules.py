"""The one module DeepSpeed wraps: everything that holds a trainable parameter."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from diffcore.model import DiffusionModel


class TrainedModules(nn.Module):
    """The model's modules that hold trainable parameters (always the backbone, text encoders when
    an adapter or a method unfroze parts of them) and the method's own modules, as children of one
    module. Methods keep calling the model and their modules directly; this only groups parameters
    so DeepSpeed's clipping, zeroing, broadcast, ZeRO partitioning and checkpoints cover all of them.
    """

    def __init__(self, model: DiffusionModel, method_modules: Mapping[str, nn.Module]):
        super().__init__()
        parts = {"backbone": model.backbone}
        for name, module in model.trainable_modules().items():
            if module is not model.backbone and any(p.requires_grad for p in module.parameters()):
                parts[name] = module
        self.model = nn.ModuleDict(parts)
        self.method = nn.ModuleDict(dict(method_modules))

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise TypeError("TrainedModules only groups parameters; methods call the model and their modules")


def parameter_names(container: TrainedModules, params: list[nn.Parameter]) -> list[str]:
    """Stable names of ``params``: the backbone's own names, ``<component>.<name>`` for other model
    modules and ``method.<module>.<name>`` for the method's modules. Every trained parameter must sit
    in one of the modules DeepSpeed wraps, or it would be neither clipped, averaged, partitioned nor
    checkpointed: one outside is refused."""
    by_id: dict[int, str] = {}
    for name, p in container.named_parameters(remove_duplicate=False):
        if name.startswith("model.backbone."):
            name = name[len("model.backbone.") :]
        elif name.startswith("model."):
            name = name[len("model.") :]
        by_id.setdefault(id(p), name)
    outside = sum(id(p) not in by_id for p in params)
    if outside:
        raise TypeError(
            f"{outside} trainable parameters are in no module the kernel wraps: a method must train "
            "parameters of model.trainable_modules() or of the modules it returns from modules()"
        )
    return [by_id[id(p)] for p in params]
