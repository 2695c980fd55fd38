"""User-facing errors: one clear message naming where, what and how to fix; exit status 2."""

from __future__ import annotations

import attrs


class DiffcoreError(Exception):
    """Base class of every error diffcore raises on purpose."""


class UserError(DiffcoreError):
    """A problem with what the user handed in (job, file, image, option).

    ``where`` is a file, a ``$.dotted.path`` or a key; ``hint`` says what to do.
    The CLI prints it on one line and exits with status 2.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


@attrs.frozen
class Problem:
    """One problem found in a job: where it is and what is wrong."""

    path: str
    message: str


class ConfigError(UserError):
    """Every problem found in a job, reported together."""

    def __init__(self, problems: list[Problem], *, source: str | None = None):
        self.problems = _most_specific(problems)
        self.source = source
        lines = [f"{p.path}: {p.message}" for p in self.problems]
        head = f"{source}: " if source else ""
        noun = "problem" if len(lines) == 1 else "problems"
        message = f"{head}{len(lines)} {noun} in the job" + "".join(f"\n  {line}" for line in lines)
        super().__init__(message)

    def render(self) -> str:  # the message already holds where
        return self.message


def _most_specific(problems: list[Problem]) -> list[Problem]:
    """Drop exact repeats, and a problem that a deeper path under it already reports with the same
    message (a validator's failure surfaces both at the section and at its field; a plugin's
    validator raising ValueError reads "..., expected <its config class>" at the section)."""
    out: list[Problem] = []
    for p in problems:
        if p in out:
            continue
        deeper = any(
            p.message in (q.message, f"{q.message}, expected {p.message.rpartition(', expected ')[2]}")
            and q.path.startswith(p.path)
            and q.path[len(p.path) : len(p.path) + 1] in (".", "[")
            for q in problems
        )
        if not deeper:
            out.append(p)
    return out


class TrainingError(DiffcoreError):
    """Training cannot go on (a NaN loss, a diverged run); the last good checkpoint is kept."""


class PluginError(DiffcoreError):
    """A plugin cannot be registered (an unknown hook, an invalid record, a hook that raised)."""
