"""``diffcore plugins``: what is installed, what each plugin registers, and what went wrong."""

from __future__ import annotations

import argparse
import json
from typing import Any

from diffcore.kinds import KINDS
from diffcore.version import PLUGIN_API, __version__


def add_plugins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def plugins_command(args: argparse.Namespace) -> int:
    from diffcore.registry import ENV_DISABLE, get_registry

    report = plugins_report(get_registry())
    if args.json:
        print(json.dumps(report, indent=2), flush=True)
        return 0
    lines = [f"diffcore {__version__} (plugin API {PLUGIN_API})"]
    for p in report["plugins"]:
        lines.append(f"{p['distribution']} {p['version']} ({p['name']})")
        for kind in KINDS.values():
            names = p["registers"].get(kind.name)
            if names:
                lines.append(f"  {kind.plural.replace('_', ' ')}: {', '.join(names)}")
    for d in report["disabled"]:
        lines.append(f"{d['distribution']} {d['version']} ({d['name']}) disabled by {ENV_DISABLE}")
    for f in report["failed"]:
        lines.append(f"{f['distribution']} {f['version']} ({f['name']}) FAILED to load: {f['error']}")
    for c in report["clashes"]:
        who = " and ".join(f"{p['distribution']} (plugin {p['plugin']!r})" for p in c["providers"])
        lines.append(f"CLASH: the {c['kind'].replace('_', ' ')} {c['name']!r} is registered by {who}; it is unusable")
    for message in report["warnings"]:
        lines.append(f"WARNING: {message}")
    print("\n".join(lines), flush=True)
    return 0


def plugins_report(registry: Any) -> dict[str, Any]:
    """Everything ``diffcore plugins --json`` prints, as plain data."""
    return {
        "diffcore": __version__,
        "plugin_api": PLUGIN_API,
        "plugins": [
            {"name": p.name, "distribution": p.distribution, "version": p.version, "registers": p.registers}
            for p in registry.plugins
        ],
        "disabled": [{"name": d.name, "distribution": d.distribution, "version": d.version} for d in registry.disabled],
        "failed": [
            {"name": f.name, "distribution": f.distribution, "version": f.version, "error": f.error}
            for f in registry.failed
        ],
        "clashes": [
            {
                "kind": c.kind,
                "name": c.name,
                "providers": [{"distribution": r.distribution, "plugin": r.plugin} for r in c.providers],
            }
            for c in registry.clashes.values()
        ],
        "warnings": list(registry.warnings),
    }
