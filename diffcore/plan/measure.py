"""Measure what a job's training steps really take: ``python -m diffcore.plan.measure JOB.yaml`` trains
the job in this process and prints one JSON object with the peak memory and the step time.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on the CPU it is how far the process's
resident memory rose above its level just before the run built anything (torch, DeepSpeed and the
plugins already imported): the model's weights, the training state and the activations, which is what
the planner predicts. Before that level is read, the libraries the run will load are imported (the
job's plugins, by building its model on the meta device; torch's compiler stack, which some modules
import on their first call) and a toy step runs once, so their own memory is not counted. On the CPU
run this with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment (the planner's test does): glibc
then hands large freed blocks back at once, so the resident size follows the bytes the tensors hold,
as CUDA's max_memory_allocated does, instead of the heap's high-water mark. The run's last phase (exporting the final weights) is left out: it serialises
a copy of the weights that no training step holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def measure(job_file: str) -> dict[str, Any]:
    import deepspeed  # noqa: F401  (imported before the baseline: its import is not the job's memory)
    import torch

    from diffcore.config.job import load_job
    from diffcore.doctor.step import ResidentPeak
    from diffcore.training import checkpoint, loop

    job = load_job(job_file)
    _warm_up(job)
    cuda = torch.cuda.is_available() and job.train.device in ("auto", "cuda")
    rss = ResidentPeak()
    found: dict[str, Any] = {}
    export = checkpoint.export_weights

    def stop_then_export(*args: Any, **kwargs: Any) -> Any:
        if "peak" not in found:
            if cuda:
                torch.cuda.synchronize()
                found["peak"] = torch.cuda.max_memory_allocated()
            rss.__exit__(None, None, None)
            found.setdefault("peak", rss.growth)
        return export(*args, **kwargs)

    checkpoint.export_weights = stop_then_export
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss.__enter__()
    try:
        loop.run_job(job)
    finally:
        checkpoint.export_weights = export
    rows = [json.loads(line) for line in (Path(job.output_dir) / "metrics.jsonl").read_text().splitlines()]
    times = [row["elapsed_s"] for row in rows]
    step_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[-1]
    return {
        "peak": found["peak"],
        "measured": "cuda max_memory_allocated" if cuda else "resident memory above the level before the run",
        "step_s": step_s,
        "steps": len(rows),
        "loss": rows[-1]["loss"],
    }


def _warm_up(job: Any) -> None:
    import torch
    import torch._dynamo  # noqa: F401

    from diffcore.api import build_component
    from diffcore.plan.inventory import build_context

    build_context(job, build_component("dataset", job.data.type, job.data.config))
    layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True)
    optimizer = torch.optim.AdamW(layer.parameters())
    for _ in range(2):
        layer(torch.randn(2, 16, 64)).sum().backward()
        optimizer.step()


def main(argv: list[str] | None = None) -> int:
    # one job per process: memory a previous job freed would stay resident and hide the next one's
    args = sys.argv[1:] if argv is None else argv
    print("DIFFCORE_MEASURED " + json.dumps(measure(args[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
