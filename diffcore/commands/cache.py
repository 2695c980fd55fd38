"""``diffcore cache JOB.yaml``: precompute a job's latent and text-encoder caches."""

from __future__ import annotations

import argparse

from diffcore.errors import UserError


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job YAML file (its data section names cache_dir)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job value",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples encoded at once (default 8)")
    parser.add_argument("--device", default=None, help="where to encode (default: the job's train.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cache_command(args: argparse.Namespace) -> int:
    from diffcore.api import build_component, build_model
    from diffcore.config.job import load_job
    from diffcore.data.cache import FeatureCache, encoder_id_for_job

    job = load_job(args.job, args.overrides)
    dataset = build_component("dataset", job.data.type, job.data.config)
    cache_dir = getattr(dataset, "cache_dir", None)
    if not cache_dir:
        raise UserError(
            "the job has no cache directory",
            where=f"{args.job}: $.data.cache_dir",
            hint="set data.cache_dir: a folder",
        )
    cache = FeatureCache(dataset, cache_dir, encoder_id_for_job(job))
    print(f"diffcore cache: {len(dataset)} examples; {cache.summary()}", flush=True)
    if cache.needs_autoencoder or cache.text_todo:
        device = _device(args.device or job.train.device)
        # the encoders the run would use (the cache's key holds model.quantize)
        model = build_model(job.model.type, job.model.config, quantize=job.model.quantize, device=device)
        model.to(device)
        cache.build(model, batch_size=args.batch_size, progress=not args.no_progress)
    problems = getattr(dataset, "problems", [])
    if problems:
        from diffcore.data.dataset import report

        print(f"diffcore cache: {report(problems, len(dataset) + len(problems), '$.data')}", flush=True)
    print(f"diffcore cache: done; {cache.summary()} in {cache_dir}", flush=True)
    return 0
