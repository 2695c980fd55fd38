"""Plugin discovery and the registry of components.

Plugins are found through the ``diffcore.plugins`` entry-point group. A plugin whose import or
registration fails is recorded with its distribution, version and error; the others keep working.
Two components of one kind with the same name is an error naming both distributions.

Environment:
  DIFFCORE_NO_PLUGINS=1            load only the built-in components (tests)
  DIFFCORE_DISABLE_PLUGINS=a,b     skip these entry points or distributions
"""

from __future__ import annotations

import difflib
import importlib
import os
import traceback
from collections.abc import Iterable
from importlib import metadata
from types import ModuleType
from typing import Any

import attrs
import pluggy

from diffcore import hookspecs
from diffcore.errors import PluginError, UserError
from diffcore.records import KINDS, ComponentSpec

GROUP = "diffcore.plugins"
ENV_NO_PLUGINS = "DIFFCORE_NO_PLUGINS"
ENV_DISABLE = "DIFFCORE_DISABLE_PLUGINS"

# Which first-party distribution provides a component, for "pip install ..." hints.
FIRST_PARTY: dict[str, dict[str, str]] = {
    "model": {
        "dit": "diffcore-dit",
        "sd15": "diffcore-sdxl",
        "sd21": "diffcore-sdxl",
        "sdxl": "diffcore-sdxl",
        "flux": "diffcore-flux",
        "flux2": "diffcore-flux",
        "sd3": "diffcore-sd3",
    },
    "adapter": {"lora": "diffcore-lora", "dora": "diffcore-lora", "lokr": "diffcore-lora", "loha": "diffcore-lora"},
    "autoencoder": {
        "sd": "diffcore-vae",
        "sdxl": "diffcore-vae",
        "sd3": "diffcore-vae",
        "flux": "diffcore-vae",
        "flux2": "diffcore-vae",
    },
    "method": {"dreambooth": "diffcore-dreambooth", "controlnet": "diffcore-controlnet"},
}


@attrs.frozen
class PluginInfo:
    """A loaded plugin: its entry point, distribution and what it registered."""

    name: str
    distribution: str
    version: str
    registers: dict[str, list[str]] = attrs.field(factory=dict)


@attrs.frozen
class FailedPlugin:
    """A plugin that could not be loaded, and why."""

    name: str
    distribution: str
    version: str
    error: str


@attrs.frozen
class Registered:
    """A component record with the plugin that provided it."""

    spec: Any
    plugin: str
    distribution: str


BUILTIN = PluginInfo(name="builtin", distribution="diffcore", version="")


class Registry:
    """All installed components, by kind and name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.failed: list[FailedPlugin] = []
        self.components: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}

    # -- loading -------------------------------------------------------------------------------
    def register(self, plugin: ModuleType | object, info: PluginInfo) -> None:
        """Register a module or object holding hook implementations under ``info``.

        Records are collected at once; a duplicate name raises :class:`PluginError`.
        """
        self.pm.register(plugin, name=info.name)
        found: dict[str, list[str]] = {}
        try:
            for kind, hook_name in hookspecs.HOOK_OF_KIND.items():
                impl = getattr(plugin, hook_name, None)
                if impl is None:
                    continue
                for spec in _as_list(impl(), info.name, hook_name):
                    self._add(kind, spec, info)
                    found.setdefault(kind, []).append(spec.name)
        except PluginError:
            self.pm.unregister(name=info.name)
            raise
        self.plugins.append(attrs.evolve(info, registers=found))

    def _add(self, kind: str, spec: Any, info: PluginInfo) -> None:
        expected = KINDS[kind]
        if not isinstance(spec, ComponentSpec) or not isinstance(spec, expected):
            raise TypeError(f"plugin {info.name!r}: hook for {kind}s yielded {spec!r}, not a {expected.__name__}")
        table = self.components[kind]
        if spec.name in table:
            other = table[spec.name]
            raise PluginError(
                f"two plugins register the {kind} {spec.name!r}: {other.distribution} (plugin {other.plugin!r}) "
                f"and {info.distribution} (plugin {info.name!r}); uninstall one or disable it with "
                f"{ENV_DISABLE}={info.name}"
            )
        table[spec.name] = Registered(spec=spec, plugin=info.name, distribution=info.distribution)

    def load_entry_points(self, disabled: Iterable[str] = ()) -> None:
        """Load every plugin of the ``diffcore.plugins`` group except the disabled ones."""
        disabled = {d.strip() for d in disabled if d.strip()}
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in disabled or dist in disabled:
                continue
            info = PluginInfo(name=ep.name, distribution=dist, version=version)
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self.failed.append(FailedPlugin(ep.name, dist, version, _describe(exc)))
                continue
            try:
                self.register(plugin, info)
            except PluginError:
                raise
            except Exception as exc:
                self.failed.append(FailedPlugin(ep.name, dist, version, _describe(exc)))

    # -- lookup --------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str, *, where: str | None = None) -> Registered:
        """The component ``name`` of ``kind``, or a UserError that says what is installed."""
        table = self.components[kind]
        if name in table:
            return table[name]
        raise UserError(self.unknown_message(kind, name), where=where)

    def unknown_message(self, kind: str, name: str) -> str:
        installed = self.names(kind)
        parts = [f"unknown {kind} {name!r}"]
        close = difflib.get_close_matches(name, installed, n=1, cutoff=0.6)
        if close:
            parts.append(f"did you mean {close[0]!r}?")
        parts.append("installed: " + (", ".join(installed) if installed else "none"))
        dist = FIRST_PARTY.get(kind, {}).get(name)
        if dist:
            failed = [f for f in self.failed if f.distribution == dist]
            if failed:
                parts.append(f"{dist} is installed but failed to load: {failed[0].error}")
            else:
                parts.append(f"it is provided by {dist}: pip install {dist}")
        return "; ".join(parts)

    def hook(self) -> Any:
        return self.pm.hook


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=GROUP))


def _as_list(result: Any, plugin: str, hook_name: str) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, ComponentSpec):
        return [result]
    try:
        return list(result)
    except TypeError:
        raise TypeError(f"plugin {plugin!r}: {hook_name} returned {result!r}, not records") from None


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


_REGISTRY: Registry | None = None


def build_registry(*, autoload: bool | None = None, disabled: Iterable[str] | None = None) -> Registry:
    """A fresh registry: the built-ins, then the installed plugins (unless turned off)."""
    if autoload is None:
        autoload = os.environ.get(ENV_NO_PLUGINS, "").lower() not in {"1", "true", "yes"}
    if disabled is None:
        disabled = os.environ.get(ENV_DISABLE, "").split(",")
    registry = Registry()
    registry.register(importlib.import_module("diffcore.builtin"), BUILTIN)
    if autoload:
        registry.load_entry_points(disabled)
    return registry


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests); ``None`` rebuilds it on next use."""
    global _REGISTRY
    _REGISTRY = registry
