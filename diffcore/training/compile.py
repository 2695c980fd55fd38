"""``train.compile``: torch.compile over the backbone's repeated blocks ("blocks") or its whole
forward ("full"), for training and for ``diffcore sample --compile``.

Regional compilation compiles each repeated block *class*'s ``forward`` once and binds that one
compiled function to every block of the class, so blocks of a class share dynamo's cache (its
entries live on the forward's code object) and compile time does not grow with depth. Only
``forward`` is compiled, never ``__call__``: forward hooks (block swap's weight moves, DeepSpeed's)
stay eager, and the modules are not wrapped, so state-dict names keep no ``_orig_mod.`` prefix.

A compile failure surfaces at the first call; the call is then repeated eagerly and, when the eager
run succeeds, that block class stays eager for the rest of the process with one warning naming the
block and the reason.
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal

import attrs
import torch
from torch import nn

from diffcore.errors import UserError

CompileMode = Literal[False, "blocks", "full"]


class CompileWarning(UserWarning):
    """A block that could not compile runs eagerly."""


class CompiledForward:
    """One class's ``forward``, compiled once and bound to each of its instances; falls back to the
    eager ``forward`` for good after a compile failure."""

    def __init__(
        self, cls: type[nn.Module], name: str, compiler: Callable[[Callable[..., Any]], Callable[..., Any]]
    ):
        self.cls = cls
        #: the first module bound to it, named in the warning (``blocks.0 (DiTBlock)``)
        self.name = name
        self.eager = cls.forward
        self.compiled = compiler(cls.forward)
        self.failure: str | None = None

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            return self.eager(module, *args, **kwargs)
        try:
            return self.compiled(module, *args, **kwargs)
        except _compile_errors() as exc:
            # Only dynamo's and the backend's own errors: others (activation checkpointing stops its
            # recomputation by raising through the forward) pass. An error the eager forward raises
            # too is the caller's, not the compiler's: it propagates from the eager run.
            out = self.eager(module, *args, **kwargs)
            self.failure = _reason(exc)
            warnings.warn(
                f"train.compile: {self.name} could not compile and runs eagerly: {self.failure}",
                CompileWarning,
                stacklevel=2,
            )
            return out


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    return (TorchDynamoException, FailOnRecompileLimitHit)


def _reason(exc: BaseException) -> str:
    # dynamo wraps the backend's error ("backend='inductor' raised: ..."); its first lines say why
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else ""
    return f"{type(exc).__name__}: {text}"[:300]


@attrs.define(eq=False)
class CompiledBackbone:
    """What :func:`compile_backbone` compiled; :meth:`stats` reads dynamo's caches for the log."""

    mode: str
    forwards: list[CompiledForward]
    #: modules whose ``forward`` is bound to a compiled one, by name
    modules: dict[str, nn.Module]
    #: dynamo's counters and compile time when compiling began, to report this run's share
    _breaks_at: int = 0
    _seconds_at: float = 0.0

    def graphs(self) -> int:
        """Cache entries (compiled graphs) over the compiled forwards' code objects."""
        return sum(len(_cache_entries(f.eager)) for f in self.forwards)

    def recompiles(self) -> int:
        """Graphs compiled beyond the first of each forward (new shapes, dtypes, module types)."""
        return sum(max(0, len(_cache_entries(f.eager)) - 1) for f in self.forwards)

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "compiled": len(self.modules),
            "classes": len(self.forwards),
            "graphs": self.graphs(),
            "recompiles": self.recompiles(),
            "graph_breaks": graph_breaks() - self._breaks_at,
            "compile_s": round(compile_seconds() - self._seconds_at, 1),
            "eager": {f.name: f.failure for f in self.forwards if f.failure is not None},
        }

    def summary(self) -> str:
        s = self.stats()
        text = (
            f"train.compile {s['mode']}: {s['compiled']} module(s) of {s['classes']} class(es), {s['graphs']} graph(s), "
            f"{s['recompiles']} recompile(s), {s['graph_breaks']} graph break(s), {s['compile_s']:g} s compiling"
        )
        if s["eager"]:
            text += "; eager after a compile failure: " + ", ".join(s["eager"])
        return text


#: what each backbone got compiled with, for the loop's metrics (a weak map: a freed model takes its record along)
_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledBackbone] = weakref.WeakKeyDictionary()


def compile_backbone(
    model: Any,
    mode: CompileMode,
    *,
    backend: str | Callable[..., Any] = "inductor",
    dynamic: bool | None = None,
) -> CompiledBackbone | None:
    """Compile ``model.backbone`` in place: ``"blocks"`` each class of the blocks in
    ``model.repeated_blocks()`` once, ``"full"`` the backbone's forward; False does nothing.

    ``dynamic=None`` lets dynamo mark a dimension dynamic once it changes (buckets of several
    resolutions compile about twice, not once per bucket)."""
    if not mode:
        return None
    backbone: nn.Module = model.backbone
    if mode == "full":
        targets = {"": backbone}
    elif mode == "blocks":
        targets = _repeated_blocks(model)
    else:
        raise UserError(
            f"unknown compile mode {mode!r}", where="$.train.compile", hint="use false, blocks or full"
        )

    # One compiled forward serves every block of its class: its graphs multiply over the class's
    # widths (a UNet's levels), grad modes (training, sampling) and shape changes, past dynamo's
    # default of 8 per function, after which it would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def compiler(fn: Callable[..., Any]) -> Callable[..., Any]:
        return torch.compile(fn, backend=backend, dynamic=dynamic)

    by_class: dict[type[nn.Module], CompiledForward] = {}
    for name, module in targets.items():
        cls = type(module)
        if "forward" in vars(module):
            raise UserError(
                f"{name or 'the backbone'} ({cls.__name__}) already has its own forward (compiled twice, or patched)",
                where="$.train.compile",
            )
        if cls not in by_class:
            by_class[cls] = CompiledForward(cls, f"{name or 'backbone'} ({cls.__name__})", compiler)
        # bound per instance, so copy.deepcopy rebinds it to the copy
        module.forward = types.MethodType(by_class[cls], module)
    compiled = CompiledBackbone(
        mode=str(mode), forwards=list(by_class.values()), modules=dict(targets),
        breaks_at=graph_breaks(), seconds_at=compile_seconds(),
    )  # fmt: skip
    _COMPILED[backbone] = compiled
    return compiled


def _repeated_blocks(model: Any) -> dict[str, nn.Module]:
    paths = model.repeated_blocks()
    if not paths:
        raise UserError(
            f"{type(model).__name__} declares no repeated blocks to compile",
            where="$.train.compile",
            hint="use compile: full (the whole backbone) for this model",
        )
    blocks: dict[str, nn.Module] = {}
    for path in paths:
        container = model.backbone.get_submodule(path)
        if not isinstance(container, nn.ModuleList):
            raise TypeError(
                f"repeated_blocks() names {path!r}, a {type(container).__name__}, not an nn.ModuleList"
            )
        for index, block in enumerate(container):
            blocks[f"{path}.{index}"] = block
    return blocks


def compile_for_training(model: Any, train: Any) -> CompiledBackbone | None:
    """``train.compile`` (a job's TrainConfig) applied to ``model`` once its adapter is attached and
    block swap installed, before DeepSpeed wraps it."""
    check_compile(train.compile, zero_stage=train.deepspeed.zero_stage, blocks_to_swap=train.blocks_to_swap)
    return compile_backbone(model, train.compile)


def log_compile(compiled: CompiledBackbone | None, *, main: bool) -> None:
    """One line at the end of a run: graphs, recompiles, graph breaks, compile time, eager blocks."""
    if compiled is not None and main:
        print(f"diffcore: {compiled.summary()}", flush=True)


def compiled_metrics(model: Any) -> dict[str, int]:
    """``{"recompiles": n}`` for a compiled backbone (a metrics key), else ``{}``; cheap (no syncs)."""
    compiled = _COMPILED.get(model.backbone)
    return {} if compiled is None else {"recompiles": compiled.recompiles()}


def check_compile(mode: CompileMode, *, zero_stage: int, blocks_to_swap: int) -> None:
    """Refuse the combinations compile cannot serve, before anything is built."""
    if not mode:
        return
    if zero_stage == 3:
        raise UserError(
            "train.compile does not work with zero_stage 3 (its hooks gather parameters inside every layer)",
            where="$.train.compile",
            hint="use zero_stage 0-2 with compile, or compile: false",
        )
    if mode == "full" and blocks_to_swap:
        raise UserError(
            "compile: full would trace block swap's weight moves into the graph",
            where="$.train.compile",
            hint="use compile: blocks with train.blocks_to_swap (block swap's hooks stay eager)",
        )


def graph_breaks() -> int:
    """Graph breaks dynamo has taken in this process so far."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def compile_seconds() -> float:
    """Seconds this process has spent compiling (dynamo and the backend, forward and backward)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def _cache_entries(fn: Callable[..., Any]) -> list[Any]:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return list(_debug_get_cache_entry_list(fn.__code__))
