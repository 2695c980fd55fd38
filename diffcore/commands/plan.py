"""``diffcore plan``: predict a job's peak device memory and choose the cheapest settings that fit.

The model is built on the meta device (no weights are loaded or allocated) and one training step at
the largest bucket runs there, counting every tensor it creates (docs: README, "Memory planner").
"""

from __future__ import annotations

import argparse


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job YAML file")
    parser.add_argument(
        "--vram", required=True, help="device memory per GPU, e.g. 24GB (GB and GiB both mean 2**30 bytes)"
    )
    parser.add_argument(
        "--ram", help="host memory for offloaded state and swapped blocks, e.g. 64GB (default: not checked)"
    )
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the job runs on (ZeRO shards over them)")
    parser.add_argument(
        "--write", metavar="NEW.yaml", help="write the job with the chosen settings to this file"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def plan_command(args: argparse.Namespace) -> int:
    from diffcore.errors import UserError
    from diffcore.plan.sizes import parse_size

    vram = parse_size(args.vram, "--vram")
    ram = parse_size(args.ram, "--ram") if args.ram is not None else None
    if args.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}", where="--gpus")

    from diffcore.api import build_component
    from diffcore.config.job import load_job
    from diffcore.errors import ConfigError
    from diffcore.job_checks import job_problems
    from diffcore.plan.inventory import inventory
    from diffcore.plan.jobfile import with_settings, write_job
    from diffcore.plan.search import plan, settings_of
    from diffcore.plan.table import describe, render
    from diffcore.registry import get_registry

    # the checks of `diffcore validate`, with its messages
    job = load_job(args.job, args.overrides)
    problems = job_problems(job)
    if problems:
        raise ConfigError(problems, source=job.source)
    dataset = build_component("dataset", job.data.type, job.data.config)
    inv = inventory(job, dataset)
    written = settings_of(job)
    result = plan(
        inv,
        written,
        vram=vram,
        ram=ram,
        gpus=args.gpus,
        precision=job.train.mixed_precision,
        tflops=job.train.peak_tflops,
        checkpointing_available=inv.activations.checkpointed is not None,
        small_optimizers=[name for name in ("adamw8bit",) if name in get_registry().components["optimizer"]],
    )
    print(render(inv, result, gpus=args.gpus))
    if args.write:
        if result.chosen is None:
            raise UserError("nothing considered fits this device, so there is no job to write", where="--write",
                            hint="lower train.batch_size or the resolution, or plan for more GPUs")  # fmt: skip
        if args.overrides:
            raise UserError("--write writes the job file with the chosen settings; it cannot carry --set overrides",
                            where="--write", hint="put the overrides in the job file first")  # fmt: skip
        write_job(args.write, with_settings(args.job, result.chosen.settings, written))
        print(f"wrote {args.write} ({describe(result.chosen.settings, written)})")
    return 0
