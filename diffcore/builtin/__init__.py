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


@hookimpl
def diffcore_register_samplers():
    from diffcore.builtin.samplers import records

    return records()


@hookimpl
def diffcore_register_loss_weightings():
    from diffcore.builtin.loss_weightings import records

    return records()


@hookimpl
def diffcore_register_commands():
    from diffcore.builtin.commands import records

    return records()


@hookimpl
def diffcore_register_text_encoders():
    # the text-encoder toolkit lands in its own module; until it does, there is nothing to register
    try:
        from diffcore.builtin.text_encoders import records
    except ModuleNotFoundError as exc:
        if exc.name != "diffcore.builtin.text_encoders":
            raise
        return []
    return records()
