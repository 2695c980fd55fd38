"""Plugin discovery and the registry of components.

Plugins are found through the ``diffcore.plugins`` entry-point group and called through pluggy.
A plugin is loaded all or nothing: it fails, keeping none of its records, when its distribution
requires another diffcore API, its module does not import, it implements a hook that does not
exist, a hook raises, or any record it yields is invalid. A failed plugin is recorded with its
distribution, version and reason; the others keep working. Two plugins registering one name make
that name unusable (a lookup says who clashes and how to disable one) without affecting any other.

Environment:
  DIFFCORE_NO_PLUGINS=1            load only the built-in components (tests)
  DIFFCORE_DISABLE_PLUGINS=a,b     skip these entry points or distributions
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import attrs
import pluggy

from diffcore import hookspecs
from diffcore.errors import PluginError, UserError
from diffcore.kinds import KINDS, Kind
from diffcore.records import ComponentSpec, ModelSpec, Record
from diffcore.version import PLUGIN_API, __version__

GROUP = "diffcore.plugins"
ENV_NO_PLUGINS = "DIFFCORE_NO_PLUGINS"
ENV_DISABLE = "DIFFCORE_DISABLE_PLUGINS"
#: modules whose import at discovery makes every ``diffcore`` invocation slow
HEAVY_MODULES = ("torch", "deepspeed", "transformers")

# Which first-party distribution provides a component, for "pip install ..." hints: only names
# that a published distribution registers today (tests/test_registry.py checks each one).
FIRST_PARTY: dict[str, dict[str, str]] = {
    "model": {
        "dit": "diffcore-dit",
        "sd15": "diffcore-sdxl",
        "sd21": "diffcore-sdxl",
        "sdxl": "diffcore-sdxl",
        "flux": "diffcore-flux",
    },
    "adapter": {"lora": "diffcore-lora", "dora": "diffcore-lora", "lokr": "diffcore-lora", "loha": "diffcore-lora"},
    "optimizer": {
        name: "diffcore-optimizers" for name in ("adamw8bit", "adafactor", "prodigy", "schedulefree_adamw", "lion")
    },
    "autoencoder": {
        "sd": "diffcore-vae",
        "sdxl": "diffcore-vae",
        "sd3": "diffcore-vae",
        "flux": "diffcore-vae",
        "flux2": "diffcore-vae",
    },
}


@attrs.frozen
class PluginInfo:
    """A loaded plugin: its entry point, distribution and what it registered (kind -> names)."""

    name: str
    distribution: str
    version: str
    registers: dict[str, list[str]] = attrs.field(factory=dict)


@attrs.frozen
class FailedPlugin:
    """A plugin that could not be loaded, and why. ``provides`` holds the names of the valid records
    it yielded before failing (none of them registered), for hints."""

    name: str
    distribution: str
    version: str
    error: str
    provides: dict[str, list[str]] = attrs.field(factory=dict)


@attrs.frozen
class DisabledPlugin:
    """A plugin skipped because ``DIFFCORE_DISABLE_PLUGINS`` names it or its distribution."""

    name: str
    distribution: str
    version: str


@attrs.frozen
class Registered:
    """A component record with the plugin that provided it."""

    spec: Any
    plugin: str
    distribution: str


@attrs.frozen
class Clash:
    """One name of one kind registered by several plugins; the name is unusable."""

    kind: str
    name: str
    providers: tuple[Registered, ...]


class PluginWarning(UserWarning):
    """Something about the installed plugins worth fixing that does not stop diffcore."""


class _Rejected(Exception):
    """A plugin fails to load; ``staged`` holds the valid records seen before the failure."""

    def __init__(self, reason: str, staged: dict[str, list[Record]]):
        super().__init__(reason)
        self.reason = reason
        self.staged = staged


BUILTIN = PluginInfo(name="builtin", distribution="diffcore", version=__version__)


class Registry:
    """All installed components, by kind and name, and what happened to every plugin."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs.Specs)
        self.plugins: list[PluginInfo] = []
        self.failed: list[FailedPlugin] = []
        self.disabled: list[DisabledPlugin] = []
        self.clashes: dict[tuple[str, str], Clash] = {}
        self.warnings: list[str] = []
        self.components: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}

    # -- loading -------------------------------------------------------------------------------
    def register(self, plugin: object, info: PluginInfo) -> PluginInfo:
        """Register a module or object holding hook implementations under ``info`` (in-process
        plugins, tests). All or nothing: an invalid plugin raises :class:`PluginError` and keeps
        nothing. A name another plugin already registered becomes a clash, not an error."""
        try:
            return self._add(plugin, info)
        except _Rejected as exc:
            raise PluginError(f"plugin {info.name!r} ({info.distribution}) failed to load: {exc.reason}") from None

    def _add(self, plugin: object, info: PluginInfo) -> PluginInfo:
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:  # pluggy rejects bad hook signatures and duplicate plugin names
            raise _Rejected(_describe(exc), {}) from None
        try:
            staged = self._stage(plugin, info)
        except _Rejected:
            self.pm.unregister(plugin)
            raise
        registers: dict[str, list[str]] = {}
        for kind, found in staged.items():
            for record in found:
                self._put(kind, Registered(spec=record, plugin=info.name, distribution=info.distribution))
                registers.setdefault(kind, []).append(record.name)
        loaded = attrs.evolve(info, registers=registers)
        self.plugins.append(loaded)
        return loaded

    def _stage(self, plugin: object, info: PluginInfo) -> dict[str, list[Record]]:
        """Every record the plugin yields, checked; nothing is registered yet."""
        unknown = sorted(
            caller.name
            for caller in self.pm.get_hookcallers(plugin) or []
            if not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        )
        if unknown:
            raise _Rejected("; ".join(_unknown_hook(name) for name in unknown), {})
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        staged: dict[str, list[Record]] = {}
        for kind in KINDS.values():
            caller = self.pm.subset_hook_caller(kind.hook, remove_plugins=others)
            if not caller.get_hookimpls():
                continue
            try:
                results = caller()
            except Exception as exc:
                raise _Rejected(f"{kind.hook} raised {_describe(exc)}", staged) from None
            seen: set[str] = set()
            for result in results:
                for record in _as_list(result, kind, staged):
                    problem = _check(record, kind)
                    if problem is None and record.name in seen:
                        problem = f"registers the {_words(kind)} {record.name!r} twice"
                    if problem is not None:
                        raise _Rejected(problem, staged)
                    seen.add(record.name)
                    staged.setdefault(kind.name, []).append(record)
        return staged

    def _put(self, kind: str, entry: Registered) -> None:
        name = entry.spec.name
        table = self.components[kind]
        clash = self.clashes.get((kind, name))
        if clash is not None:
            self.clashes[(kind, name)] = attrs.evolve(clash, providers=(*clash.providers, entry))
        elif name in table:
            self.clashes[(kind, name)] = Clash(kind, name, (table.pop(name), entry))
        else:
            table[name] = entry

    def load_entry_points(self, disabled: Iterable[str] = ()) -> None:
        """Load every plugin of the ``diffcore.plugins`` group except the disabled ones."""
        disabled = {d.strip() for d in disabled if d.strip()}
        entry_points = sorted(_entry_points(), key=lambda e: e.name)
        self._check_disabled(disabled, entry_points)
        for ep in entry_points:
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in disabled or dist in disabled:
                self.disabled.append(DisabledPlugin(ep.name, dist, version))
                continue
            incompatible = _incompatible(ep.dist)
            if incompatible is not None:  # never imported: it may not even import against this API
                self.failed.append(FailedPlugin(ep.name, dist, version, incompatible))
                continue
            heavy_before = {m for m in HEAVY_MODULES if m in sys.modules}
            try:
                plugin = ep.load()
                self._add(plugin, PluginInfo(name=ep.name, distribution=dist, version=version))
            except _Rejected as exc:
                provides = {kind: [r.name for r in found] for kind, found in exc.staged.items()}
                self.failed.append(FailedPlugin(ep.name, dist, version, exc.reason, provides))
            except Exception as exc:  # a broken plugin must not take the others down
                self.failed.append(FailedPlugin(ep.name, dist, version, _describe(exc)))
            heavy = [m for m in HEAVY_MODULES if m in sys.modules and m not in heavy_before]
            if heavy:
                self.warnings.append(
                    f"plugin {ep.name!r} ({dist}) imports {', '.join(heavy)} when it is discovered, which slows "
                    "every diffcore command; import it inside the factories"
                )

    def _check_disabled(self, disabled: set[str], entry_points: list[metadata.EntryPoint]) -> None:
        known = {ep.name for ep in entry_points} | {ep.dist.name for ep in entry_points if ep.dist is not None}
        for name in sorted(disabled - known):
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.warnings.append(f"{ENV_DISABLE} names {name!r}, which is no installed plugin or distribution{hint}")

    # -- lookup --------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """The usable names of ``kind`` (clashing names are not)."""
        return sorted(self.components[kind])

    def get(self, kind: str, name: str, *, where: str | None = None) -> Registered:
        """The component ``name`` of ``kind``, or a UserError that says what is installed."""
        table = self.components[kind]
        if name in table:
            return table[name]
        raise UserError(self.unknown_message(kind, name), where=where)

    def unknown_message(self, kind: str, name: str) -> str:
        """Why ``name`` cannot be used: a clash, or what is installed and where it comes from."""
        clash = self.clashes.get((kind, name))
        words = _words(KINDS[kind])
        if clash is not None:
            who = " and ".join(f"{r.distribution} (plugin {r.plugin!r})" for r in clash.providers)
            switches = " or ".join(f"{ENV_DISABLE}={r.plugin}" for r in clash.providers if r.plugin != BUILTIN.name)
            return f"the {words} {name!r} is registered by both {who}, so it is unusable; uninstall one or set {switches}"
        installed = self.names(kind)
        parts = [f"unknown {words} {name!r}"]
        close = difflib.get_close_matches(name, installed, n=1, cutoff=0.6)
        if close:
            parts.append(f"did you mean {close[0]!r}?")
        parts.append("installed: " + (", ".join(installed) if installed else "none"))
        hint = self._provider_hint(kind, name)
        if hint:
            parts.append(hint)
        return "; ".join(parts)

    def _provider_hint(self, kind: str, name: str) -> str | None:
        for failed in self.failed:
            if name in failed.provides.get(kind, []):
                return f"it is provided by {failed.distribution}, which is installed but failed to load: {failed.error}"
        dist = FIRST_PARTY.get(kind, {}).get(name)
        if dist is None:
            return None
        if any(d.distribution == dist for d in self.disabled):
            return f"it is provided by {dist}, which is installed but disabled by {ENV_DISABLE}"
        broken = [f for f in self.failed if f.distribution == dist]
        if broken:
            return f"it is provided by {dist}, which is installed but failed to load: {broken[0].error}"
        return f"it is provided by {dist}: pip install {dist}"

    def versions(self) -> dict[str, str]:
        """Distribution -> version of diffcore and every loaded plugin (for checkpoint metadata)."""
        out = {"diffcore": __version__}
        for plugin in self.plugins:
            out.setdefault(plugin.distribution, plugin.version)
        return out

    def hook(self) -> Any:
        return self.pm.hook


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=GROUP))


def _words(kind: Kind) -> str:
    return kind.name.replace("_", " ")


def _unknown_hook(name: str) -> str:
    close = difflib.get_close_matches(name, hookspecs.HOOKS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; diffcore's hooks are {', '.join(hookspecs.HOOKS)}"
    return f"implements {name!r}, which is no diffcore hook{hint}"


def _as_list(result: Any, kind: Kind, staged: dict[str, list[Record]]) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, Record):
        return [result]
    try:
        return list(result)
    except TypeError:
        raise _Rejected(f"{kind.hook} returned {result!r}, not a list of {kind.record.__name__}", staged) from None


def _check(record: Any, kind: Kind) -> str | None:
    """Why ``record`` cannot be registered as ``kind``, or None."""
    if not isinstance(record, kind.record):
        return f"{kind.hook} yielded {record!r}, not a {kind.record.__name__}"
    if isinstance(record, ComponentSpec) and not (isinstance(record.config, type) and attrs.has(record.config)):
        return (
            f"the {_words(kind)} {record.name!r} has config {record.config!r}, which is not an attrs class "
            "(declare it with @attrs.define)"
        )
    if isinstance(record, ModelSpec) and record.cache_aware and "load_encoders" not in attrs.fields_dict(record.config):
        return f"the model {record.name!r} is cache_aware but its config has no load_encoders field"
    return None


def _incompatible(dist: metadata.Distribution | None) -> str | None:
    """Why the plugin distribution cannot run on this diffcore (its diffcore requirement excludes
    this version), or None."""
    requires = dist.requires if dist is not None else None
    if not requires:
        return None
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for text in requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != "diffcore":
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if not req.specifier.contains(__version__, prereleases=True):
            spec = ",".join(sorted((str(s) for s in req.specifier), key=lambda s: s.startswith("<")))
            return f"built for diffcore {spec}; this is diffcore {__version__} (plugin API {PLUGIN_API})"
    return None


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


_REGISTRY: Registry | None = None


def build_registry(*, autoload: bool | None = None, disabled: Iterable[str] | None = None) -> Registry:
    """A fresh registry: the built-ins, then the installed plugins (unless turned off). Problems
    worth a warning are also issued as :class:`PluginWarning`."""
    if autoload is None:
        autoload = os.environ.get(ENV_NO_PLUGINS, "").lower() not in {"1", "true", "yes"}
    if disabled is None:
        disabled = os.environ.get(ENV_DISABLE, "").split(",")
    registry = Registry()
    registry.register(importlib.import_module("diffcore.builtin"), BUILTIN)
    if autoload:
        registry.load_entry_points(disabled)
    for message in registry.warnings:
        warnings.warn(message, PluginWarning, stacklevel=2)
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
