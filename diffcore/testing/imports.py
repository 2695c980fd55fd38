"""Checking that a plugin's entry module stays cheap to discover (torch-free)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata

from diffcore.registry import GROUP, HEAVY_MODULES

_PROBE = """
import importlib, json, sys
before = set(sys.modules)
target = {target!r}
module, _, attribute = target.partition(":")
obj = importlib.import_module(module)
for part in filter(None, attribute.split(".")):
    obj = getattr(obj, part)
heavy = {heavy!r}
print(json.dumps({{"heavy": [m for m in heavy if m in sys.modules and m not in before]}}))
"""


def heavy_imports(target: str, heavy: Iterable[str] = HEAVY_MODULES) -> list[str]:
    """The modules of ``heavy`` that importing ``target`` ("pkg.module[:attr]", what an entry point
    names) pulls in, measured in a fresh interpreter."""
    code = _PROBE.format(target=target, heavy=tuple(heavy))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise AssertionError(f"importing {target} failed:\n{out.stderr[-3000:]}")
    return list(json.loads(out.stdout.strip().splitlines()[-1])["heavy"])


def assert_light_import(target: str, heavy: Iterable[str] = HEAVY_MODULES) -> None:
    """Fail when importing ``target`` ("pkg.module[:attr]") imports torch, deepspeed or
    transformers (or the given ``heavy`` modules)."""
    found = heavy_imports(target, heavy)
    if found:
        raise AssertionError(
            f"importing {target} imports {', '.join(found)}; diffcore discovers plugins on every command, "
            "so import these inside the factories instead"
        )


def assert_entry_points_light(distribution: str, heavy: Iterable[str] = HEAVY_MODULES) -> list[str]:
    """:func:`assert_light_import` for every ``diffcore.plugins`` entry point of the installed
    ``distribution``; returns what they name. Fails when the distribution declares none."""
    dist = metadata.distribution(distribution)
    targets = [ep.value for ep in dist.entry_points if ep.group == GROUP]
    if not targets:
        raise AssertionError(f"{distribution} declares no entry point in the {GROUP!r} group")
    heavy = tuple(heavy)
    for target in targets:
        assert_light_import(target, heavy)
    return targets
