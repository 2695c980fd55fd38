"""``diffcore run``: train a job."""

from __future__ import annotations

import argparse
import os


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job YAML file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a job value, e.g. --set train.lr=1e-4 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument(
        "--report", action="store_true",
        help="keep output_dir/report.html current while training (adds the report callback)",
    )  # fmt: skip
    # the DeepSpeed launcher passes it; the rank comes from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run_command(args: argparse.Namespace) -> int:
    from diffcore.config.job import load_job

    job = load_job(args.job, args.overrides)
    if args.report and not any(c.type == "report" for c in job.callbacks):
        from diffcore.api import component_config
        from diffcore.config.job import Section

        # last, so it sees what the other callbacks wrote at the same step
        job.callbacks.append(Section(type="report", config=component_config("callback", "report", {})))
    from diffcore.training import run_job

    result = run_job(job, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"diffcore: trained {result.steps} steps; weights in {result.final}", flush=True)
    return 0
