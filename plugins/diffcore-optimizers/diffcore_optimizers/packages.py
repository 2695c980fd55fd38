"""The optimizer libraries, imported when an optimizer is built; a missing one is a user error."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType

from diffcore import Problem, UserError

WHERE = "$.train.optimizer.type"


def not_installed(module: str, *, optimizer: str) -> str:
    return f"the {optimizer} optimizer needs the Python package {module}, which is not installed"


def missing(module: str, *, optimizer: str, install: str) -> list[Problem]:
    """A problem (for ``diffcore validate``, before any model loads) when ``module`` is not installed;
    found without importing it."""
    if importlib.util.find_spec(module) is not None:
        return []
    return [Problem(WHERE, f"{not_installed(module, optimizer=optimizer)} (pip install {install})")]


def require(module: str, *, optimizer: str, install: str) -> ModuleType:
    """Import ``module`` for ``optimizer``; if it is not installed, a one-line error (exit 2) naming
    ``$.train.optimizer.type`` and the ``pip install`` that provides it."""
    quiet = logging.getLogger(module)
    level = quiet.level
    # bitsandbytes warns at import about CPU kernels for 4-bit matmuls, which its optimizers never use
    quiet.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise UserError(not_installed(module, optimizer=optimizer), where=WHERE, hint=f"pip install {install}") from None
    except ImportError as exc:
        raise UserError(
            f"the {optimizer} optimizer needs {module}, which is installed but failed to import: {exc}",
            where=WHERE,
            hint=f"reinstall it: pip install --force-reinstall {install}",
        ) from None
    finally:
        quiet.setLevel(level)
