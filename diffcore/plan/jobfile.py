"""Writing the planner's choice into a new job file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from diffcore.config.job import read_yaml
from diffcore.plan.costs import Settings


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {} if node.get(key) is None else {"type": node[key]}
        node = node[key]
    node[last] = value


def with_settings(source: str | Path, s: Settings, written: Settings) -> dict[str, Any]:
    """The job file (its ``_base_`` files merged in) with the settings that differ from ``written``."""
    data = copy.deepcopy(read_yaml(source))
    changes: list[tuple[str, Any]] = []
    if s.blocks_to_swap != written.blocks_to_swap:
        changes.append(("train.blocks_to_swap", s.blocks_to_swap))
    if s.quantize != written.quantize:
        changes.append(("model.quantize", s.quantize))
    if s.checkpointing != written.checkpointing:
        changes.append(("train.gradient_checkpointing", s.checkpointing))
    if s.optimizer != written.optimizer:
        # a new optimizer's section: the old one's options belong to another optimizer
        changes.append(("train.optimizer", {"type": s.optimizer}))
    if s.zero_stage != written.zero_stage:
        changes.append(("train.deepspeed.zero_stage", s.zero_stage))
    if s.offload_optimizer != written.offload_optimizer:
        changes.append(("train.deepspeed.offload_optimizer", s.offload_optimizer))
    if s.offload_params != written.offload_params:
        changes.append(("train.deepspeed.offload_params", s.offload_params))
    for key, value in changes:
        _set(data, key, value)
    return data


def write_job(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
