"""Few-step quality of the distillation methods on the quickstart DiT (issue 18's judged figure).

The teacher is the quickstart job (examples/quickstart.yaml: a class-conditional flow DiT on the
synthetic shapes), trained here or taken from a finished run (``--teacher-run``). From its EMA
weights the script distils, each a ``diffcore run`` of a job it writes (full finetunes that start from
the teacher, their scheduler spacing sigmas 1 to 1/steps, so 2 steps are 1 -> 0.5 -> 0):
  - ``reflow``: pairs from the teacher's ODE (20 Euler steps, guidance 4.5; 2.5 to 8 did no better),
    half the training times at the 2- and 4-step levels (``focus``);
  - ``consistency``: consistency distillation with the teacher's guided Euler step (guidance 4.5).
Each model is scored as the quickstart's class_agreement callback scores it (seed 1234): class
agreement by colour, and by colour and form. The reference is the teacher at 20 steps as the
quickstart samples it (its callback's sampler and guidance); the teacher at 2 and 4 steps, with that
sampler and with Euler at 4.5, is the baseline distillation must beat (and, for context, the same
sampler without guidance: as many model calls per step as a student makes). The students are scored
with Euler and with ``lcm`` at 2 and 4 steps, guidance 1.

    OMP_NUM_THREADS=1 python benchmarks/distill_quality.py --teacher-run runs/quickstart
    python benchmarks/distill_quality.py --work /tmp/distill   # trains the teacher first
    python benchmarks/distill_quality.py --work /tmp/distill10k --teacher-steps 10000   # a converged one

Finished stages are kept in ``--work`` and reused (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAIR_GUIDANCE = 4.5  # the guidance of the teacher's Euler ODE that makes reflow's pairs (2.5 to 8: no better)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/distill_quality"))
    p.add_argument("--teacher-run", type=Path, default=None, help="a finished quickstart output_dir (default: train one)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="train the teacher this many steps instead of the quickstart's (a converged teacher)")
    p.add_argument("--methods", default="reflow,consistency")
    p.add_argument("--pairs", type=int, default=1024, help="reflow pairs")
    p.add_argument("--reflow-steps", type=int, default=2400)
    p.add_argument("--consistency-steps", type=int, default=1500)
    p.add_argument("--reflow-name", default="reflow", help="the reflow run's folder in --work")
    p.add_argument("--focus", type=float, default=0.5, help="reflow: share of training times at the 2- and 4-step levels")
    p.add_argument("--reflow-loss", default="mse", choices=["mse", "l1", "huber"], help="reflow: the regression loss")
    p.add_argument("--huber-delta", type=float, default=1.0, help="reflow: huber's delta (--reflow-loss huber)")
    p.add_argument("--consistency-name", default="consistency", help="the consistency run's folder in --work")
    p.add_argument("--consistency-focus", type=float, default=0.0, help="consistency: share of intervals at the 2-/4-step levels")
    p.add_argument("--consistency-guidance", type=float, default=PAIR_GUIDANCE, help="consistency: the teacher's guidance")
    p.add_argument("--huber-c", type=float, default=0.001, help="consistency: the pseudo-Huber constant")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--per-class", type=int, default=16, help="samples per class (16: as the callback; 128 for a figure to +-0.02)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--spacings", default="flux", help="flow sigma spacings to score the 2- and 4-step rows with")
    return p.parse_args()


def diffcore_run(job: dict[str, Any], folder: Path) -> None:
    """Train ``job`` with ``diffcore run`` unless ``folder`` already holds its final weights
    (an interrupted run resumes)."""
    if (folder / "final").is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    job_file = folder.with_suffix(".yaml")
    job_file.write_text(yaml.safe_dump({**job, "output_dir": str(folder)}, sort_keys=False))
    cmd = [sys.executable, "-m", "diffcore.cli", "run", str(job_file)]
    if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()):
        cmd.append("--resume")
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    start = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    print(f"[{folder.name}] trained in {time.time() - start:.0f} s", flush=True)


def teacher_weights(args: argparse.Namespace) -> Path:
    """The teacher: the EMA weights of the quickstart run (trained here unless given)."""
    run = args.teacher_run
    if run is None:
        run = args.work / "teacher"
        quickstart = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
        if args.teacher_steps is not None:
            quickstart["train"]["steps"] = args.teacher_steps
        diffcore_run(quickstart, run)
    ema = run / "final" / "ema.safetensors"
    return ema if ema.is_file() else run / "final" / "model.safetensors"


def load_dit(weights: Path) -> Any:
    """The quickstart DiT with ``weights`` (a run's export)."""
    from safetensors.torch import load_file

    import diffcore

    model = diffcore.load_model("dit", **quickstart_model())
    model.load_exported(load_file(str(weights)), where=str(weights))
    return model


def quickstart_model() -> dict[str, Any]:
    section = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["model"]
    return {k: v for k, v in section.items() if k != "type"}


def student_job(name: str, teacher: Path, method: dict[str, Any], steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """A full finetune of the quickstart DiT that starts from the teacher (``method.teacher``)."""
    return {
        "name": name,
        "seed": 0,
        "model": {"type": "dit", **quickstart_model()},
        # 1 to 1/steps: the students' few-step levels (1, 0.5 at 2 steps; the default spacing's 2
        # steps are one in effect)
        "scheduler": {"type": "flow", "sigma_spacing": "flux"},
        "method": method,
        "data": {"type": "synthetic", "resolution": 32, "size": 4096},
        "train": {
            "steps": steps, "batch_size": args.batch, "lr": args.lr, "lr_schedule": "cosine", "warmup_steps": 50,
            "grad_clip": 1.0, "ema_decay": 0.999, "log_every": 50, "checkpoint_every": 500,
        },
    }  # fmt: skip


def score(model: Any, *, steps: int, sampler: str, guidance: float, per_class: int, spacing: str = "auto") -> dict[str, float]:
    """The class_agreement callback's figures for ``model``; ``spacing`` is the flow scheduler's
    ``sigma_spacing`` ("auto": the quickstart's, 1 to shift(1/T); "flux": 1 to 1/steps)."""
    import torch

    import diffcore
    from diffcore.data.synthetic import classify
    from diffcore.sampling import generate

    names = diffcore.build_component("dataset", "synthetic", {"resolution": 32, "size": 4}).class_names
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    scheduler = diffcore.build_component("scheduler", "flow", {"sigma_spacing": spacing})
    with torch.no_grad():
        pixels = generate(model, scheduler, batch={"labels": labels}, height=32, width=32, steps=steps,
                          sampler=sampler, guidance=guidance, seed=1234).float().cpu()  # fmt: skip
    return {
        "class": float((classify(pixels, names) == labels).float().mean()),
        "form": float((classify(pixels, names, check_form=True) == labels).float().mean()),
    }


def quickstart_sampling() -> tuple[str, float]:
    """The sampler and guidance the quickstart's class_agreement callback scores the teacher with."""
    callbacks = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["callbacks"]
    agreement = next(c for c in callbacks if c["type"] == "class_agreement")
    return agreement["sampler"], float(agreement["guidance"])


def main() -> None:
    args = parse()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = teacher_weights(args)
    rows: list[tuple[str, int, str, str, float, dict[str, float]]] = []
    sampler, guidance = quickstart_sampling()
    # the teacher as the quickstart samples it (the reference, lcm at 2.5), with the ODE sampler its
    # reflow pairs come from (Euler at 4.5), and unguided (as many model calls per step as a student)
    teacher_ways = [(sampler, guidance), ("euler", PAIR_GUIDANCE), (sampler, 1.0)]

    # at 2 steps the quickstart's sigma spacing (1 to shift(1/T)) steps from 1 to 0.001 and then to 0:
    # one step in effect; "flux" spacing (1 to 1/steps) makes the two steps 1 -> 0.5 -> 0
    spacings = [s for s in args.spacings.split(",") if s]
    model = load_dit(teacher).to(args.device)
    # the teacher's figures are kept in --work with the stages (they take the longest to sample)
    cache_file = args.work / "teacher-scores.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    def teacher_score(steps: int, spacing: str, way: tuple[str, float]) -> dict[str, float]:
        key = f"{teacher}:{teacher.stat().st_mtime_ns}:{steps}:{spacing}:{args.per_class}:{way[0]}:{way[1]}"
        if key not in cached:
            cached[key] = score(model, steps=steps, sampler=way[0], guidance=way[1], per_class=args.per_class,
                                spacing=spacing)  # fmt: skip
            cache_file.write_text(json.dumps(cached, indent=2))
        return cached[key]

    for way in teacher_ways[:2]:  # the first row is the reference
        rows.append(("teacher (undistilled)", 20, way[0], "auto", way[1], teacher_score(20, "auto", way)))
    for way in teacher_ways:
        for spacing in spacings:
            for steps in (2, 4):
                rows.append(("teacher (undistilled)", steps, way[0], spacing, way[1], teacher_score(steps, spacing, way)))

    students: list[tuple[str, Any]] = []
    methods = [m for m in args.methods.split(",") if m]
    if "reflow" in methods:
        method = {"type": "reflow", "pairs": args.pairs, "shard_size": 256, "sample_steps": 20,
                  "guidance": PAIR_GUIDANCE, "generation_batch": 256, "cache_dir": str(args.work / "reflow_pairs"),
                  "teacher": str(teacher), "focus": args.focus, "focus_steps": [2, 4], "loss": args.reflow_loss,
                  "huber_delta": args.huber_delta}  # fmt: skip
        folder = args.work / args.reflow_name
        diffcore_run(student_job(args.reflow_name, teacher, method, args.reflow_steps, args), folder)
        students.append(("reflow", load_dit(folder / "final" / "ema.safetensors")))
    if "consistency" in methods:
        method = {"type": "consistency", "guidance": [args.consistency_guidance], "num_solver_steps": 20,
                  "target_ema": 0.95, "huber_c": args.huber_c, "teacher": str(teacher),
                  "focus": args.consistency_focus, "focus_steps": [2, 4]}  # fmt: skip
        folder = args.work / args.consistency_name
        diffcore_run(student_job(args.consistency_name, teacher, method, args.consistency_steps, args), folder)
        students.append(("consistency", load_dit(folder / "final" / "ema.safetensors")))
    # every student with both few-step samplers, guidance 1 (the students learnt the guided teacher)
    for name, student in students:
        for student_sampler in ("euler", "lcm"):
            for spacing in spacings:
                for steps in (2, 4):
                    figures = score(student, steps=steps, sampler=student_sampler, guidance=1.0,
                                    per_class=args.per_class, spacing=spacing)  # fmt: skip
                    rows.append((name, steps, student_sampler, spacing, 1.0, figures))

    reference = rows[0][5]
    print("\n| model | steps | sampler | sigma spacing | guidance | class agreement | colour-and-form | form - teacher@20 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, steps, row_sampler, spacing, row_guidance, figures in rows:
        gap = figures["form"] - reference["form"]
        print(f"| {name} | {steps} | {row_sampler} | {spacing} | {row_guidance:g} | {figures['class']:.3f} | "
              f"{figures['form']:.3f} | {gap:+.3f} |")  # fmt: skip
    (args.work / f"quality-{'-'.join(methods) or 'teacher'}.json").write_text(json.dumps(
        [{"model": n, "steps": st, "sampler": sm, "spacing": sp, "guidance": g, **f} for n, st, sm, sp, g, f in rows],
        indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
