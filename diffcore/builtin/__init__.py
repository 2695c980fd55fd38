"""The kernel's own components, registered through the same hooks as any plugin.

Each hook imports its records lazily from a torch-free module; the factories import torch.
"""

from __future__ import annotations

from diffcore.hookspecs import hookimpl


@hookimpl
def diffcore_register_schedulers():
    from diffcore.builtin.schedulers import records

    return records()


@hookimpl
def diffcore_register_datasets():
    from diffcore.builtin.datasets import records

    return records()


@hookimpl
def diffcore_register_callbacks():
    from diffcore.builtin.callbacks import records

    return records()


@hookimpl
def diffcore_register_methods():
    from diffcore.builtin.methods import records

    return records()


@hookimpl
def diffcore_register_optimizers():
    from diffcore.builtin.optimizers import records

    return records()
