"""The ``diffcore`` command line.

Every subcommand is a command record (``diffcore_register_commands``): the built-in ones
(run, validate, plugins, sample, cache) and any a plugin adds. Building the parser imports only
argparse, the registry and each command's argument set-up, so ``--help`` and ``plugins`` never import
torch. A user error prints one message on stderr and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from diffcore.errors import PluginError, TrainingError, UserError
from diffcore.training.interrupt import RunInterrupted
from diffcore.version import PLUGIN_API, __version__

EXIT_USER_ERROR = 2
EXIT_TRAINING_ERROR = 1
# what a shell reports for a process ended by SIGPIPE (128 + 13): `diffcore plugins | head`
EXIT_BROKEN_PIPE = 141


def build_parser(registry: Any = None) -> argparse.ArgumentParser:
    """The parser with one subcommand per command record of ``registry`` (default: the installed)."""
    if registry is None:
        from diffcore.registry import get_registry

        registry = get_registry()
    parser = argparse.ArgumentParser(
        prog="diffcore", description="Train image diffusion models with plugins for every architecture and method."
    )
    parser.add_argument("--version", action="version", version=f"diffcore {__version__} (plugin API {PLUGIN_API})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # the built-in commands first, in the order they register, then the plugins' by name
    entries = sorted(registry.components["command"].values(), key=lambda e: e.plugin != "builtin")
    for entry in entries:
        spec = entry.spec
        command = sub.add_parser(spec.name, help=spec.description, description=spec.description)
        try:
            spec.add_arguments(command)
        except Exception as exc:  # one broken command must not take the others down
            command.set_defaults(_unavailable=f"{entry.distribution} could not set up its options: {exc}")
        command.set_defaults(_command=spec)
    for (kind, name), _clash in sorted(registry.clashes.items()):
        if kind == "command":
            command = sub.add_parser(name, help="(unusable: registered by two plugins)")
            command.set_defaults(_unavailable=registry.unknown_message(kind, name))
    return parser


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    unavailable = getattr(args, "_unavailable", None)
    if unavailable:
        raise UserError(f"`diffcore {args.command}` is not available: {unavailable}")
    command = getattr(args, "_command", None)
    if command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    return int(command.run(args))


def _show_plugin_warning(original: Any):
    from diffcore.registry import PluginWarning

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, PluginWarning):
            print(f"diffcore: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_plugin_warning(warnings.showwarning)
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
    # an unusable command explains itself whatever options it was given
    if extra and not getattr(args, "_unavailable", None):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.debug:  # third-party start-up output (op builds, warnings) is shown, here and in children
        os.environ["DIFFCORE_DEBUG"] = "1"
    try:
        return _dispatch(args, parser)
    except (UserError, PluginError) as exc:
        if args.debug:
            raise
        message = exc.render() if isinstance(exc, UserError) else str(exc)
        print(f"diffcore: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingError as exc:
        if args.debug:
            raise
        print(f"diffcore: training stopped: {exc}", file=sys.stderr)
        return EXIT_TRAINING_ERROR
    except RunInterrupted as exc:
        print(f"diffcore: {exc}", file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:
        # the reader went away (`| head`): nothing more to say, and nothing to flush at exit either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("diffcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
