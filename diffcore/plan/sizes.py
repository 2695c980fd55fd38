"""Memory sizes as users write them (``24GB``, ``80GiB``, ``12000MB``) and as the planner prints them."""

from __future__ import annotations

import re

from diffcore.errors import UserError

# Cards are sold as "24GB" and hold 24 GiB: GB and GiB both mean 2**30 bytes here, as nvidia-smi's
# MiB figures do.
_UNITS = {"": 2**30, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, option: str) -> int:
    """``"24GB"`` -> bytes (a bare number is GiB); a UserError naming ``option`` otherwise."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(
            f"cannot read {text!r} as a memory size",
            where=option,
            hint=f"write it as a number with a unit, e.g. {option} 24GB (GB and GiB both mean 2**30 bytes)",
        )
    return int(float(match.group(1)) * _UNITS[unit])


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 / 10 else f"{count / 2**20:.0f} MiB"
