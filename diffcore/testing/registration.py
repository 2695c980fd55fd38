"""Registering plugin objects in-process, without pip (torch-free)."""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterable, Iterator
from importlib import metadata
from typing import Any

from diffcore import registry as _registry
from diffcore.registry import GROUP, PluginInfo, Registry, build_registry

#: the distribution an in-process plugin that is not installed is listed under (``diffcore plugins``,
#: clash messages, the versions recorded in checkpoints)
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


def _distribution(plugin: object) -> tuple[str, str]:
    """The installed distribution (name, version) holding the plugin's module, or ("in-process", "0")
    for code that is not installed (a test's own plugin)."""
    module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
    package = module.partition(".")[0]
    # editable installs list no package files, so look for a diffcore entry point into the package first
    for ep in metadata.entry_points(group=GROUP):
        if ep.dist is not None and ep.module.partition(".")[0] == package:
            return ep.dist.name, ep.dist.version
    for dist in metadata.packages_distributions().get(package, []):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return IN_PROCESS, "0"


def registry_with(
    *plugins: object | str, autoload: bool = False, disabled: Iterable[str] = ()
) -> Registry:
    """A fresh registry: the built-ins, the installed plugins when ``autoload`` (minus ``disabled``),
    then each of ``plugins`` (a module or object with hook implementations, or its import path
    ``"pkg.module[:attr]"``), registered all or nothing like an installed plugin (under its installed
    distribution's name and version when its package is installed). An invalid plugin
    raises :class:`diffcore.PluginError` with the reason ``diffcore plugins`` would show."""
    registry = build_registry(autoload=autoload, disabled=list(disabled))
    for plugin in plugins:
        obj = load_plugin_object(plugin) if isinstance(plugin, str) else plugin
        name = _plugin_name(obj)
        distribution, version = _distribution(obj)
        registry.register(obj, PluginInfo(name=name, distribution=distribution, version=version))
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
