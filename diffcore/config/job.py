"""The job schema and how a job file becomes a validated :class:`Job`.

A job is YAML read with ``yaml.safe_load`` (with a bound on what aliases expand to). ``_base_: [other.yaml, ...]`` inherits (deep merge, this
file wins, lists replaced). ``--set dotted.key=value`` overrides are parsed as YAML scalars and then
structured to the field's type. Sections a plugin provides (model, adapter, method, scheduler, data,
train.optimizer, train.loss_weighting, callbacks: the sections of :data:`diffcore.kinds.KINDS`) are
chosen by ``type:`` and their other keys are structured into that plugin's attrs config, unknown keys
rejected. Every problem is collected and reported together.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

from diffcore.config.structure import ExpectedError, structure, unstructure
from diffcore.config.yaml_bounded import YAMLTooLarge, load_yaml
from diffcore.errors import ConfigError, Problem, UserError
from diffcore.kinds import KINDS
from diffcore.quantize.modes import MODES, library_for
from diffcore.training.fast_paths import check_sdpa_backends

TOP_KEYS = ["name", "output_dir", "seed", "model", "adapter", "method", "scheduler", "data", "train", "callbacks"]

# Sections whose content is a plugin's config, and the kind that provides each (from the kinds table):
# top-level ones, ones inside `train`, and lists of them.
PLUGIN_SECTIONS = {
    kind.section: kind.name
    for kind in sorted(KINDS.values(), key=lambda k: TOP_KEYS.index(k.section) if k.section in TOP_KEYS else 0)
    if kind.section in TOP_KEYS and not kind.repeated
}
TRAIN_SECTIONS = {
    kind.section.removeprefix("train."): kind.name
    for kind in KINDS.values()
    if kind.section is not None and kind.section.startswith("train.")
}
LIST_SECTIONS = {kind.section: kind.name for kind in KINDS.values() if kind.section in TOP_KEYS and kind.repeated}
# What a section the job leaves out selects; a section missing here is simply absent.
DEFAULT_SECTIONS: dict[str, dict[str, Any]] = {"method": {"type": "diffusion"}, "train.optimizer": {"type": "adamw"}}
REQUIRED_SECTIONS = ("model", "method", "data")


@attrs.define
class Section:
    """A plugin-provided section: the component's name and its structured config."""

    type: str
    config: Any
    #: the model section's kernel-level ``quantize`` key (``none|int8|fp8|nf4``, diffcore.quantize):
    #: read by the kernel for every architecture, never part of a plugin's config
    quantize: str = "none"

    def to_dict(self) -> dict[str, Any]:
        out = {"type": self.type, **unstructure(self.config)}
        if self.quantize != "none":
            out["quantize"] = self.quantize
        return out


def _at_least(low: float):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and value < low:
            word = "at least 1" if low == 1 else ("not negative" if low == 0 else f"at least {low}")
            raise ExpectedError(f"must be {word}, got {value}")

    return check


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value <= 0:
        raise ExpectedError(f"must be positive, got {value}")


def _fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not 0.0 < value < 1.0:
        raise ExpectedError(f"must be between 0 and 1, got {value}")


@attrs.define(kw_only=True)
class DeepSpeedConfig:
    """How DeepSpeed shards and offloads (``train.deepspeed``)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    #: raw DeepSpeed config keys merged over the generated config (expert use)
    extra: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class TrainConfig:
    """The ``train`` section: the loop, precision, optimisation and checkpointing."""

    steps: int = attrs.field(default=1000, validator=_at_least(1))
    batch_size: int = attrs.field(default=1, validator=_at_least(1))
    gradient_accumulation: int = attrs.field(default=1, validator=_at_least(1))
    lr: float = attrs.field(default=1e-4, validator=_positive)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = attrs.field(default=0, validator=_at_least(0))
    min_lr_ratio: float = 0.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_clip: float | None = 1.0
    checkpoint_every: int = attrs.field(default=0, validator=_at_least(0))
    keep_last: int = attrs.field(default=2, validator=_at_least(0))
    log_every: int = attrs.field(default=1, validator=_at_least(1))
    #: an EMA of the trained weights with this decay (with the warm-up, the most it ramps up to); None: no EMA
    ema_decay: float | None = attrs.field(default=None, validator=_fraction)
    #: ramp the decay up with the steps averaged, as diffusers' EMAModel(use_ema_warmup=True):
    #: 1 - (1 + n / ema_inv_gamma) ** -ema_power; false: ema_decay from the first average on
    ema_warmup: bool = True
    ema_inv_gamma: float = attrs.field(default=1.0, validator=_positive)
    ema_power: float = attrs.field(default=2 / 3, validator=_positive)
    #: the least decay once averaging (diffusers' min_decay)
    ema_min_decay: float = attrs.field(default=0.0, validator=_at_least(0))
    #: the EMA copies the weights up to this step and averages after it (diffusers' update_after_step)
    ema_start_step: int = attrs.field(default=0, validator=_at_least(0))
    gradient_checkpointing: bool = False
    num_workers: int = attrs.field(default=0, validator=_at_least(0))
    #: drop a bucket's last, incomplete batch each epoch; false fills it by repeating the bucket's examples
    drop_last: bool = True
    device: str = "auto"
    #: intra-op CPU threads per process; None: $OMP_NUM_THREADS if set, else physical cores / local processes
    num_threads: int | None = attrs.field(default=None, validator=_at_least(1))
    #: warn when nothing (no step, no phase) finishes for this many seconds; None: never
    stall_warning_s: float | None = 600.0
    #: seconds a collective waits for the other processes before the run stops naming the rank
    collective_timeout_s: float = attrs.field(default=1800.0, validator=_positive)
    #: torch.compile the backbone: false (eager), "blocks" (each repeated block once, regional
    #: compilation: compile time does not grow with depth) or "full" (the whole backbone)
    compile: Literal[False, "blocks", "full"] = False
    #: keep this many of the backbone's repeated blocks' frozen weights in (pinned) CPU memory and copy
    #: each to the device just before it runs; 0: none
    blocks_to_swap: int = attrs.field(default=0, validator=_at_least(0))
    #: fast paths, each on where it is safe (docs/speed.md): TF32 matmuls and convolutions on CUDA
    tf32: bool = True
    #: channels_last memory format for convolutional backbones: "auto" (on CUDA only), true or false
    channels_last: Literal["auto", True, False] = "auto"
    #: the scaled-dot-product-attention backends allowed, in torch's names (flash, efficient, cudnn,
    #: math); None: torch's own choice
    sdpa_backends: list[str] | None = attrs.field(default=None, validator=check_sdpa_backends)
    #: the device's peak dense TFLOP/s in the training dtype, for the MFU figure; None: from diffcore's
    #: table of common GPUs (no MFU where the device is not in it)
    peak_tflops: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    deepspeed: DeepSpeedConfig = attrs.Factory(DeepSpeedConfig)


@attrs.define(kw_only=True)
class Job:
    """A whole training job."""

    name: str = "diffcore"
    output_dir: str = ""
    seed: int = 0
    model: Section
    adapter: Section | None = None
    method: Section
    scheduler: Section | None = None
    data: Section
    train: TrainConfig = attrs.Factory(TrainConfig)
    optimizer: Section | None = None
    #: ``train.loss_weighting``; None: the scheduler's own ``loss_weight``
    loss_weighting: Section | None = None
    callbacks: list[Section] = attrs.Factory(list)
    #: where the job was read from (not part of the YAML)
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved job as plain data (what ``job.yaml`` in the output holds)."""
        out: dict[str, Any] = {"name": self.name, "output_dir": self.output_dir, "seed": self.seed}
        out["model"] = self.model.to_dict()
        if self.adapter is not None:
            out["adapter"] = self.adapter.to_dict()
        out["method"] = self.method.to_dict()
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.to_dict()
        out["data"] = self.data.to_dict()
        train = unstructure(self.train)
        if self.optimizer is not None:
            train["optimizer"] = self.optimizer.to_dict()
        if self.loss_weighting is not None:
            train["loss_weighting"] = self.loss_weighting.to_dict()
        out["train"] = train
        out["callbacks"] = [c.to_dict() for c in self.callbacks]
        return out



def _ema_problems(raw: dict[str, Any], train: TrainConfig) -> list[Problem]:
    """The EMA keys that contradict each other, or that have no effect because there is no EMA."""
    if train.ema_decay is None:
        # a resolved job.yaml lists every key at its default: only a value set otherwise is idle
        fields = attrs.fields_dict(TrainConfig)
        return [
            Problem(f"$.train.{key}", "has no effect without train.ema_decay (set it, e.g. 0.999, or remove this key)")
            for key in ("ema_warmup", "ema_inv_gamma", "ema_power", "ema_min_decay", "ema_start_step")
            if key in raw and getattr(train, key) != fields[key].default
        ]
    if train.ema_min_decay > train.ema_decay:
        return [
            Problem(
                "$.train.ema_min_decay",
                f"{train.ema_min_decay} is above train.ema_decay {train.ema_decay} (the decay ramps from min up to ema_decay)",
            )
        ]
    return []


# -- reading YAML --------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    """One YAML file as a mapping, with ``_base_`` files merged underneath it."""
    return _read_with_bases(Path(path), [])


def _read_with_bases(path: Path, chain: list[Path]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in [*chain, path])
        raise UserError(f"_base_ files include each other: {cycle}", where=str(path))
    if not path.is_file():
        raise UserError("job file not found", where=str(path), hint="check the path")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"the job file is not UTF-8 text (byte {exc.start}: {exc.reason})", where=str(path)) from None
    except YAMLTooLarge as exc:
        raise UserError(str(exc), where=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"invalid YAML: {problem}", where=where) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"a job file must be a mapping of sections, got {type(data).__name__}", where=str(path))
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError("_base_ must be a file name or a list of file names", where=f"{path}: $._base_")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, _read_with_bases(path.parent / base, [*chain, path]))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings merge key by key, everything else replaces.

    A section whose ``type`` changes is replaced whole (its old options belong to another plugin).
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and old.get("type", value.get("type")) == value.get(
            "type", old.get("type")
        ):
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; the value is parsed as a YAML scalar or flow value."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"bad --set {item!r}", where="--set", hint="write --set dotted.key=value, e.g. --set train.lr=1e-4")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except YAMLTooLarge as exc:
            raise UserError(str(exc), where=f"--set {key}") from None
        except yaml.YAMLError:
            value = raw
        node: Any = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, key, depth, create=True)
        last = parts[-1]
        if isinstance(node, list):
            index = _index(last, key, node)
            node[index] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise UserError(f"cannot set {key!r}: {'.'.join(parts[:-1])} is not a section", where="--set")
    return out


def _child(node: Any, part: str, key: str, depth: int, *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(part, key, node)]
    if not isinstance(node, dict):
        raise UserError(f"cannot set {key!r}: {'.'.join(key.split('.')[:depth])} is not a section", where="--set")
    if part not in node or node[part] is None:
        if not create:
            raise KeyError(part)
        node[part] = {}
    return node[part]


def _index(part: str, key: str, node: list[Any]) -> int:
    try:
        index = int(part)
        node[index]
    except (ValueError, IndexError):
        raise UserError(f"cannot set {key!r}: {part!r} is not an index of a list of {len(node)}", where="--set") from None
    return index


# -- structuring ---------------------------------------------------------------------------------
def structure_job(data: dict[str, Any], *, source: str | None = None, registry: Any = None) -> Job:
    """Validate plain job data into a :class:`Job`, reporting every problem at once."""
    from diffcore.registry import get_registry

    registry = registry or get_registry()
    problems: list[Problem] = []
    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; sections are: {', '.join(TOP_KEYS)}"
            problems.append(Problem(f"$.{key}", f"unknown section{hint}"))

    def section(key: str, kind: str, raw: Any, path: str, required: bool) -> Section | None:
        if raw is None:
            if required:
                problems.append(Problem(path, f"required section missing (give it a type: naming a {kind})"))
            return None
        if isinstance(raw, str):
            raw = {"type": raw}
        if not isinstance(raw, dict):
            problems.append(Problem(path, f"expected a mapping with a type: key, got {type(raw).__name__}"))
            return None
        raw = dict(raw)
        quantize = raw.pop("quantize", "none") if key == "model" and path == "$.model" else "none"
        if quantize not in MODES:
            problems.append(Problem(f"{path}.quantize", f"must be one of {', '.join(MODES)}, got {quantize!r}"))
            return None
        if quantize != "none" and importlib.util.find_spec(library_for(quantize).module) is None:
            lib = library_for(quantize)
            problems.append(Problem(f"{path}.quantize", f"{quantize} needs {lib.module}: pip install '{lib.pip}'"))
        name = raw.pop("type", None)
        if not isinstance(name, str) or not name:
            installed = ", ".join(registry.names(kind)) or "none installed"
            problems.append(Problem(f"{path}.type", f"required: the {kind} to use ({installed})"))
            return None
        if name not in registry.components[kind]:
            problems.append(Problem(f"{path}.type", registry.unknown_message(kind, name)))
            return None
        spec = registry.components[kind][name].spec
        try:
            config = structure(raw, spec.config, path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None
        return Section(type=name, config=config, quantize=quantize)

    sections: dict[str, Any] = {}
    for key, kind in PLUGIN_SECTIONS.items():
        raw = data.get(key, DEFAULT_SECTIONS.get(key))
        sections[key] = section(key, kind, raw, f"$.{key}", required=key in REQUIRED_SECTIONS)

    train_raw = data.get("train") or {}
    if not isinstance(train_raw, dict):
        problems.append(Problem("$.train", "expected a mapping of keys to values"))
        train_raw = {}
    train_raw = dict(train_raw)
    train_sections: dict[str, Section | None] = {}
    for key, kind in TRAIN_SECTIONS.items():
        raw = train_raw.pop(key) if key in train_raw else DEFAULT_SECTIONS.get(f"train.{key}")
        train_sections[key] = section(key, kind, raw, f"$.train.{key}", False)
    train = TrainConfig()
    try:
        train = structure(train_raw, TrainConfig, "$.train")
        problems.extend(_ema_problems(train_raw, train))
    except ConfigError as exc:
        problems.extend(exc.problems)

    lists: dict[str, list[Section]] = {}
    for key, kind in LIST_SECTIONS.items():
        lists[key] = []
        raw_list = data.get(key) or []
        if not isinstance(raw_list, list):
            problems.append(Problem(f"$.{key}", f"expected a list of {kind} sections"))
            raw_list = []
        for i, raw in enumerate(raw_list):
            built = section(key, kind, raw, f"$.{key}[{i}]", True)
            if built is not None:
                lists[key].append(built)

    scalars: dict[str, Any] = {}
    for key, conv in (("name", str), ("output_dir", str), ("seed", int)):
        if key in data:
            try:
                scalars[key] = structure(data[key], conv, f"$.{key}")
            except ConfigError as exc:
                problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, source=source)
    name = scalars.get("name", "diffcore")
    output_dir = scalars.get("output_dir") or str(Path("runs") / name)
    return Job(
        name=name,
        output_dir=output_dir,
        seed=scalars.get("seed", 0),
        model=sections["model"],
        adapter=sections["adapter"],
        method=sections["method"],
        scheduler=sections["scheduler"],
        data=sections["data"],
        train=train,
        optimizer=train_sections["optimizer"],
        loss_weighting=train_sections["loss_weighting"],
        callbacks=lists["callbacks"],
        source=source,
    )


def load_job(path: str | Path, overrides: list[str] | None = None, *, registry: Any = None) -> Job:
    """Read, merge, override and validate a job file."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return structure_job(data, source=str(path), registry=registry)


def dump_job(job: Job) -> str:
    return yaml.safe_dump(job.to_dict(), sort_keys=False)


__all__ = ["Job", "Section", "TrainConfig", "DeepSpeedConfig", "load_job", "structure_job"]
