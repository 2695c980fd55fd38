"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s quickstart`, `nox -s bench`.

Every session installs torch pinned to 2.13.0 first (an unpinned torch pulls gigabytes of CUDA
wheels), then diffcore and every package under plugins/ and contrib/ in editable mode.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
# Pinned so a new release's rules or inference cannot fail CI on unchanged code.
CHECKERS = ["ruff==0.17.6", "mypy==2.4.1"]


def packages() -> list[str]:
    found = sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))
    found += sorted(p.parent for p in ROOT.glob("contrib/*/pyproject.toml"))
    return [str(p.relative_to(ROOT)) for p in found]


def install(session: nox.Session, extras: str = "", only: list[str] | None = None) -> None:
    session.install(TORCH)
    session.install("-e", f".{extras}")
    # in one pip call, so a plugin that depends on another (diffcore-sd3 on diffcore-vae) finds it
    # here instead of on PyPI, whatever their order
    session.install(*[arg for pkg in (only if only is not None else packages()) for arg in ("-e", pkg)])


def chromium(session: nox.Session) -> None:
    """Debian's chromium, which tests/test_report.py drives headless to render report.html. Installed
    only as root on a system with apt-get; elsewhere that test says it skipped and why."""
    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    session.run("apt-get", "update", "-qq", external=True, success_codes=[0, 100])
    session.run("apt-get", "install", "-y", "-qq", "chromium", external=True, success_codes=[0, 100])


@nox.session
def tests(session: nox.Session) -> None:
    """Style and types (ruff over the repo, mypy over diffcore/), then the kernel's and every plugin's
    tests (slow ones included; `-- -m "not slow"` to skip them)."""
    install(session, "[test]")
    session.install(*CHECKERS)
    chromium(session)
    session.run("ruff", "check", ".")
    # mypy type-checks against the installed torch and transformers, so it runs in this session
    session.run("mypy")
    targets = ["tests"] + [f"{p}/tests" for p in packages() if (ROOT / p / "tests").is_dir()]
    session.run("pytest", "-q", *targets, *session.posargs, env={"DS_ACCELERATOR": "cpu"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff alone: no torch to install (the tests session also runs mypy)."""
    session.install(CHECKERS[0])
    session.run("ruff", "check", ".")


@nox.session
def quickstart(session: nox.Session) -> None:
    """Install what the main job needs and train it: a class-conditional DiT on synthetic shapes."""
    install(session, only=["plugins/diffcore-dit"])
    session.run("diffcore", "run", "examples/quickstart.yaml", *session.posargs, env={"DS_ACCELERATOR": "cpu"})


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory side by side with the references, each in one run."""
    install(session, "[test]")
    for script in sorted(ROOT.glob("benchmarks/[!_]*.py")):  # _*.py: modules the scripts share
        session.run("python", str(script.relative_to(ROOT)), *session.posargs, env={"DS_ACCELERATOR": "cpu"})
