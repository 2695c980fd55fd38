"""``diffcore report``: write a run's ``report.html`` (and serve it on localhost with ``--serve``)."""

from __future__ import annotations

import argparse


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="a run's output directory (the job's output_dir)")
    parser.add_argument(
        "--serve", type=int, default=None, metavar="PORT",
        help="then serve the folder on http://127.0.0.1:PORT/report.html (localhost only; 0 picks a free port), "
        "rewriting the page on each visit",
    )  # fmt: skip


def report_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffcore.errors import UserError
    from diffcore.report import write_report

    folder = Path(args.output_dir).expanduser()
    path = write_report(folder)
    print(f"diffcore: wrote {path}", flush=True)
    if args.serve is None:
        return 0
    if not 0 <= args.serve <= 65535:
        raise UserError(f"port {args.serve} is out of range", where="--serve", hint="give a port in 0..65535")
    from diffcore.report.serve import serve

    serve(folder, args.serve)
    return 0
