"""The ``diffcore`` command line.

Only argparse and the registry are imported up front: ``--help`` and ``plugins`` never import
torch. A user error prints one message on stderr and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from diffcore import __version__
from diffcore.errors import PluginError, TrainingError, UserError

EXIT_USER_ERROR = 2
EXIT_TRAINING_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffcore", description="Train image diffusion models with plugins for every architecture and method."
    )
    parser.add_argument("--version", action="version", version=f"diffcore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train a job")
    run.add_argument("job", help="job YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a job value, e.g. --set train.lr=1e-4 (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    validate = sub.add_parser("validate", help="check a job without running it")
    validate.add_argument("job", help="job YAML file")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    sample = sub.add_parser("sample", help="generate images from a trained or pretrained model")
    cache = sub.add_parser("cache", help="precompute latent and text caches for a job")
    _add_lazy(sample, "diffcore.commands.sample", "add_sample_arguments")
    _add_lazy(cache, "diffcore.commands.cache", "add_cache_arguments")
    return parser


def _add_lazy(parser: argparse.ArgumentParser, module: str, func: str) -> None:
    import importlib

    try:
        getattr(importlib.import_module(module), func)(parser)
    except (ImportError, AttributeError):
        parser.set_defaults(_unavailable=module)


def cmd_run(args: argparse.Namespace) -> int:
    from diffcore.config.job import load_job

    job = load_job(args.job, args.overrides)
    from diffcore.training import run_job

    result = run_job(job, resume=args.resume)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"diffcore: trained {result.steps} steps; weights in {result.final}", flush=True)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from diffcore.config.job import load_job

    job = load_job(args.job, args.overrides)
    print(f"{args.job}: ok (model {job.model.type}, data {job.data.type}, {job.train.steps} steps)")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from diffcore.registry import get_registry

    reg = get_registry()
    if args.json:
        data = {
            "plugins": [
                {"name": p.name, "distribution": p.distribution, "version": p.version or __version__, "registers": p.registers}
                for p in reg.plugins
            ],
            "failed": [
                {"name": f.name, "distribution": f.distribution, "version": f.version, "error": f.error} for f in reg.failed
            ],
        }
        print(json.dumps(data, indent=2))
        return 0
    for p in reg.plugins:
        print(f"{p.distribution} {p.version or __version__} ({p.name})")
        for kind, names in sorted(p.registers.items()):
            print(f"  {kind}s: {', '.join(names)}")
    for f in reg.failed:
        print(f"{f.distribution} {f.version} ({f.name}) FAILED to load: {f.error}")
    return 0


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if getattr(args, "_unavailable", None):
        raise UserError(f"`diffcore {args.command}` is not available in this installation ({args._unavailable} missing)")
    if args.command == "run":
        return cmd_run(args)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "plugins":
        return cmd_plugins(args)
    if args.command == "sample":
        from diffcore.commands.sample import sample_command

        return sample_command(args)
    if args.command == "cache":
        from diffcore.commands.cache import cache_command

        return cache_command(args)
    parser.print_help()
    return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        print("diffcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
