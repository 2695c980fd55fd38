"""``diffcore validate``: check a job without running it."""

from __future__ import annotations

import argparse


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def validate_command(args: argparse.Namespace) -> int:
    from diffcore.config.job import load_job
    from diffcore.errors import ConfigError
    from diffcore.job_checks import job_problems

    job = load_job(args.job, args.overrides)
    # what a run would otherwise find only after its start-up (bucket feasibility, missing data paths),
    # and cross-section problems only a component can judge (a model that takes no residuals...)
    problems = job_problems(job)
    if problems:
        raise ConfigError(problems, source=job.source)
    print(f"{args.job}: ok (model {job.model.type}, data {job.data.type}, {job.train.steps} steps)")
    return 0
