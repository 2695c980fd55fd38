"""``python -m diffcore.testing.child [--plugin PKG.MODULE[:ATTR]]... [--autoload] ARGS...``: the
``diffcore`` command with plugin objects registered in-process first, for subprocess and torchrun
tests of plugins that are not pip-installed. Without ``--plugin`` it is plain ``diffcore``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    plugins: list[str] = []
    autoload = False
    while args and args[0] in {"--plugin", "--autoload"}:
        flag = args.pop(0)
        if flag == "--autoload":
            autoload = True
        else:
            plugins.append(args.pop(0))
    if plugins:
        from diffcore.registry import set_registry
        from diffcore.testing.registration import registry_with

        set_registry(registry_with(*plugins, autoload=autoload))
    from diffcore.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
