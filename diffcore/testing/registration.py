"""Registering plugin objects in-process, without pip (torch-free)."""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterable, Iterator
from typing import Any

from diffcore import registry as _registry
from diffcore.registry import PluginInfo, Registry, build_registry

#: the distribution name an in-process plugin is listed under (``diffcore plugins``, clash messages)
IN_PROCESS = "in-process"


def load_plugin_object(spec: str) -> object:
    """``"package.module"`` or ``"package.module:attribute"`` -> that module or object (what an entry
    point's value names)."""
    module_name, _, attribute = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attribute.split(".")):
        obj = getattr(obj, part)
    return obj


def _plugin_name(plugin: object) -> str:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return type(plugin).__name__


def registry_with(
    *plugins: object | str, autoload: bool = False, disabled: Iterable[str] = ()
) -> Registry:
    """A fresh registry: the built-ins, the installed plugins when ``autoload`` (minus ``disabled``),
    then each of ``plugins`` (a module or object with hook implementations, or its import path
    ``"pkg.module[:attr]"``), registered all or nothing like an installed plugin. An invalid plugin
    raises :class:`diffcore.PluginError` with the reason ``diffcore plugins`` would show."""
    registry = build_registry(autoload=autoload, disabled=list(disabled))
    for plugin in plugins:
        obj = load_plugin_object(plugin) if isinstance(plugin, str) else plugin
        name = _plugin_name(obj)
        registry.register(obj, PluginInfo(name=name, distribution=IN_PROCESS, version="0"))
    return registry


@contextlib.contextmanager
def plugins_registered(
    *plugins: object | str, autoload: bool = False, disabled: Iterable[str] = ()
) -> Iterator[Registry]:
    """Install :func:`registry_with` (same arguments) as the process-wide registry for the block,
    then restore the one that was there (or none: rebuilt on next use)."""
    previous = _registry._REGISTRY
    registry = registry_with(*plugins, autoload=autoload, disabled=disabled)
    _registry.set_registry(registry)
    try:
        yield registry
    finally:
        _registry.set_registry(previous)
