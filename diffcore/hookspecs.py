"""The hook specifications a diffcore plugin implements.

A plugin is a module (named by an entry point in the ``diffcore.plugins`` group) holding functions
marked with ``diffcore.hookimpl``. There is one registration hook per kind of component, named
``diffcore_register_<plural>`` (``diffcore_register_models``, ``diffcore_register_samplers``...;
the full list is :data:`diffcore.kinds.KINDS`). Each takes no arguments and returns an iterable of
that kind's records from :mod:`diffcore.records`. Importing the plugin's module must stay cheap: no
torch, deepspeed or transformers at import time; import them inside the factories.

A function marked ``hookimpl`` whose name is not one of these hooks makes the plugin fail to load
(``diffcore plugins`` names the nearest valid hook), so a misspelling cannot pass silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from diffcore.kinds import KINDS, Kind

PROJECT = "diffcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def _spec(kind: Kind) -> Callable[[], Iterable[Any]]:
    def spec() -> Iterable[Any]:
        raise NotImplementedError  # a specification; pluggy never calls it

    spec.__name__ = spec.__qualname__ = kind.hook
    spec.__doc__ = f"{kind.description} Returns {kind.record.__name__} records."
    return hookspec(spec)


class Specs:
    """The registration hooks, one per kind (the namespace handed to pluggy)."""


for _kind in KINDS.values():
    setattr(Specs, _kind.hook, staticmethod(_spec(_kind)))
del _kind

HOOKS: tuple[str, ...] = tuple(kind.hook for kind in KINDS.values())
