"""Training a tiny job from a dict, in-process or as a ``diffcore run`` subprocess (torch-free import)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml


@attrs.frozen
class JobRun:
    """What a run left: its output folder, the job file it read, the parsed ``metrics.jsonl`` rows,
    and for a subprocess its exit status and output (0 and "" in-process)."""

    output_dir: Path
    job_file: Path
    metrics: list[dict[str, Any]]
    returncode: int = 0
    stdout: str = ""
    stderr: str = ""

    @property
    def losses(self) -> list[float]:
        """The logged ``loss`` of every metrics row, in order."""
        return [float(row["loss"]) for row in self.metrics]

    def weights(self, name: str = "model", folder: str = "final") -> dict[str, Any]:
        """The tensors of ``<folder>/<name>.safetensors`` (``folder``: "final" or "step-N")."""
        from safetensors.torch import load_file

        base = self.output_dir / "final" if folder == "final" else self.output_dir / "checkpoints" / folder
        return load_file(str(base / f"{name}.safetensors"))


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_job(job: Mapping[str, Any], output_dir: Path) -> Path:
    """``job`` with ``output_dir`` set, written as ``<output_dir>.yaml`` beside the output folder."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    path = output_dir.with_name(output_dir.name + ".yaml")
    path.write_text(yaml.safe_dump({**job, "output_dir": str(output_dir)}, sort_keys=False))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_command(
    args: Sequence[str], *, plugins: Iterable[str] = (), autoload: bool = False, processes: int = 1
) -> list[str]:
    """The command line running ``diffcore ARGS`` with ``plugins`` (import paths) registered in the
    child, under torchrun when ``processes`` > 1."""
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(_free_port())]
    extra = [part for plugin in plugins for part in ("--plugin", plugin)]
    if autoload and extra:
        extra.append("--autoload")
    return [*launch, "-m", "diffcore.testing.child", *extra, *args]


def run_cli(
    *args: str,
    plugins: Iterable[str] = (),
    autoload: bool = False,
    processes: int = 1,
    env: Mapping[str, str] | None = None,
    pythonpath: Iterable[str | Path] = (),
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``diffcore ARGS`` in a subprocess (its exit status is not checked). ``plugins`` are import
    paths ("pkg.module[:attr]") registered in-process in the child (with only the built-ins unless
    ``autoload``); ``pythonpath`` folders are prepended to ``PYTHONPATH`` so the child finds them."""
    full_env = dict(os.environ, **(env or {}))
    if processes > 1:
        full_env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(p) for p in pythonpath]
    if paths:
        full_env["PYTHONPATH"] = os.pathsep.join([*paths, full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = cli_command(args, plugins=plugins, autoload=autoload, processes=processes)
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout)


def run_job(
    job: Mapping[str, Any],
    output_dir: str | Path,
    *,
    resume: bool = False,
    overrides: Iterable[str] = (),
    spawn: bool = False,
    processes: int = 1,
    plugins: Iterable[object | str] = (),
    autoload: bool = False,
    env: Mapping[str, str] | None = None,
    pythonpath: Iterable[str | Path] = (),
    expect_exit: int | None = 0,
    timeout: float = 600,
) -> JobRun:
    """Write ``job`` (a job dict; its ``output_dir`` is set to ``output_dir``) as YAML and train it.

    In-process by default: the job file is read and validated as ``diffcore run`` does
    (``--set``-style ``overrides`` applied), then trained by ``diffcore.training.run_job`` in this
    process with the process-wide registry, or with one holding the built-ins and ``plugins`` when
    given; errors raise. With ``spawn=True`` or ``processes`` > 1 (torchrun) it runs
    ``diffcore run`` in a child (``plugins`` as import paths, see :func:`run_cli`) and fails unless
    the exit status is ``expect_exit`` (None: any)."""
    output_dir = Path(output_dir)
    job_file = write_job(job, output_dir)
    overrides = list(overrides)
    if spawn or processes > 1:
        names = [p if isinstance(p, str) else _import_path(p) for p in plugins]
        args = ["run", str(job_file), *(part for o in overrides for part in ("--set", o))]
        if resume:
            args.append("--resume")
        out = run_cli(
            *args, plugins=names, autoload=autoload, processes=processes, env=env, pythonpath=pythonpath, timeout=timeout
        )
        if expect_exit is not None and out.returncode != expect_exit:
            raise AssertionError(
                f"diffcore run exited {out.returncode}, expected {expect_exit}\n--- stdout\n{out.stdout[-3000:]}"
                f"\n--- stderr\n{out.stderr[-5000:]}"
            )
        return JobRun(output_dir, job_file, read_metrics(output_dir), out.returncode, out.stdout, out.stderr)

    from diffcore.config.job import apply_overrides, read_yaml, structure_job
    from diffcore.testing.registration import plugins_registered
    from diffcore.training import run_job as train

    def run() -> None:
        data = apply_overrides(read_yaml(job_file), overrides)
        train(structure_job(data, source=str(job_file)), resume=resume)

    plugins = list(plugins)
    if plugins:
        with plugins_registered(*plugins, autoload=autoload):
            run()
    else:
        run()
    return JobRun(output_dir, job_file, read_metrics(output_dir))


def _import_path(plugin: object) -> str:
    import types

    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    raise TypeError(f"a subprocess needs plugins as import paths ('pkg.module[:attr]'), got {plugin!r}")
