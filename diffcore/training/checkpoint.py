"""Checkpoints: atomic, resumable, pruned.

``checkpoints/step-<N>/`` holds DeepSpeed's resume state (``deepspeed/``: every trainable module,
the method's too, with optimizer and lr-schedule state), ``trainer.json`` (step, data position,
versions), per-rank RNG states, the EMA (``ema-state.safetensors``), the method's and callbacks' own
state (``state/``), and the exported trainable weights (``model.safetensors`` or
``adapter.safetensors``, and ``<name>.safetensors`` per method module; with an EMA, its weights in
the same layout: ``ema.safetensors`` and ``ema-<name>.safetensors``). It is written under ``.tmp-step-<N>`` and renamed
into place only when complete, so a crash or kill while saving leaves the previous checkpoint as it
was and never a half-written ``step-<N>``. ``manifest.json`` (written last) records every file's size
and checksum; ``--resume`` checks the newest checkpoint against it and falls back to the newest
intact one, naming what is damaged.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from diffcore.errors import UserError
from diffcore.training.distributed import barrier, broadcast_int
from diffcore.training.ema import EMA_EXPORT_MARK, is_ema_export
from diffcore.training.manifest import MANIFEST, damage, write_manifest
from diffcore.training.reshard import UNIVERSAL_TAG, convert
from diffcore.training.safe_loading import use_safe_loading, weights_only_loading
from diffcore.training.state import load_states, save_states
from diffcore.weights import save_safetensors

STATE_TAG = "deepspeed"
#: trainer.json "format": 2 marks a checkpoint that has a manifest (older ones are resumed unchecked)
FORMAT = 2


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith("step-") and (child / "trainer.json").is_file():
                try:
                    found.append((int(child.name[5:]), child))
                except ValueError:
                    continue
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form: the global generator is always MT19937
    state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_meta"] = torch.tensor([np_state[2], np_state[3], np_state[4]], dtype=torch.float64)
    py = random.getstate()
    state["python"] = torch.tensor(py[1], dtype=torch.int64)
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    meta = state["numpy_meta"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(meta[0]), int(meta[1]), float(meta[2]))
    )
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))


def file_metadata(ctx: Any) -> dict[str, str]:
    """What every file diffcore writes records in its header: the step, the registered architecture,
    the base model and the versions of diffcore and every loaded plugin."""
    return {
        "diffcore.step": str(ctx.step),
        "diffcore.architecture": ctx.job.model.type,
        "diffcore.base_model": ctx.model.base_model,
        "diffcore.versions": json.dumps(ctx.versions, sort_keys=True),
    }


def export_weights(ctx: Any, folder: Path) -> Path:
    """Write the trainable weights into ``folder`` on rank 0 (every rank joins ZeRO-3 gathers):
    the adapter or the model, and each method module as ``<name>.safetensors``. The main path.
    A frozen backbone loaded from a file is not written when only method modules train."""
    meta = file_metadata(ctx)
    for name, module in ctx.method_modules.items():
        with ctx.gathered(module.parameters()):
            if ctx.is_main:
                tensors = {k: v.detach() for k, v in module.state_dict().items()}
                save_safetensors(tensors, folder / f"{name}.safetensors", {**meta, "diffcore.module": name})
                ctx.method.export(name, module, folder, {**meta, "diffcore.module": name})
    if ctx.adapter is not None:
        path = folder / "adapter.safetensors"
        # every rank joins the gather (ZeRO-3 partitions adapter tensors above its persistence threshold)
        with ctx.gathered(ctx.adapter_params):
            if ctx.is_main:
                ctx.adapter.save(path, None, meta)
        return path
    trained = {id(p) for p in ctx.trainable}
    model_trains = any(id(p) in trained for m in ctx.model.trainable_modules().values() for p in m.parameters())
    if ctx.method_modules and not model_trains and ctx.model.base_model:
        # only the method's modules train (a ControlNet, token embeddings) beside a backbone loaded
        # from a file: that file already holds it, so it is not copied into every checkpoint (a full
        # Flux backbone is 24 GB). A randomly initialised backbone is still written, since nothing
        # else could reproduce it.
        return folder / f"{next(iter(ctx.method_modules))}.safetensors"
    path = folder / "model.safetensors"
    with ctx.gathered():
        if ctx.is_main:
            save_safetensors(ctx.model.export_state_dict("diffusers"), path, meta)
    return path


#: the EMA's own state in a checkpoint (its tensors by trained-parameter name), what a resume loads
EMA_STATE = "ema-state.safetensors"


def export_ema(ctx: Any, folder: Path) -> None:
    """Write the EMA weights into ``folder`` (rank 0) in the layout of :func:`export_weights`' files:
    ``ema.safetensors`` as the adapter or the model file, ``ema-<name>.safetensors`` per method
    module; a file whose weights the EMA does not hold (a frozen backbone) is not written again."""
    if not ctx.is_main:
        return
    meta = {**file_metadata(ctx), EMA_EXPORT_MARK[0]: EMA_EXPORT_MARK[1]}
    averaged = {id(p) for p in ctx.ema.params}
    with ctx.ema.applied():
        for name, module in ctx.method_modules.items():
            if any(id(p) in averaged for p in module.parameters()):
                tensors = {k: v.detach() for k, v in module.state_dict().items()}
                save_safetensors(tensors, folder / f"ema-{name}.safetensors", {**meta, "diffcore.module": name})
        if ctx.adapter is not None:
            ctx.adapter.save(folder / "ema.safetensors", None, meta)
        elif any(id(p) in averaged for p in ctx.model.backbone.parameters()):
            save_safetensors(ctx.model.export_state_dict("diffusers"), folder / "ema.safetensors", meta)


def save_checkpoint(ctx: Any) -> Path:
    """Write ``checkpoints/step-<step>`` atomically on every rank; prune old ones on rank 0.

    A full disk is a one-line error naming the folder and the space needed; what was half-written is
    removed and the previous checkpoint is untouched.
    """
    root = checkpoint_root(ctx.output_dir)
    final = root / f"step-{ctx.step}"
    tmp = root / f".tmp-step-{ctx.step}"
    try:
        # at the optimizer's evaluation point: the exported weights are the ones to use, and a resumed
        # run moves from there to the training point exactly as the uninterrupted run does
        with ctx.optimizer_evaluating():
            _write_checkpoint(ctx, root, tmp, final)
    except Exception as exc:
        if not _disk_full(exc):
            raise
        needed = _folder_size(ctx.last_checkpoint) if ctx.last_checkpoint is not None else _folder_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        raise UserError(
            f"the disk filled up while writing checkpoint step-{ctx.step}: {free / 1e6:.0f} MB free, a checkpoint "
            f"needs {'about' if ctx.last_checkpoint is not None else 'more than'} {needed / 1e6:.0f} MB",
            where=str(root),
            hint="free space (or lower train.keep_last) and pass --resume; the previous checkpoint is intact",
        ) from None
    ctx.last_checkpoint = final
    return final


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (OSError, safetensors' or torch's writer errors, which wrap the OS error in
    their message) says the disk is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left", "StorageFull", "os error 28", "Disk quota exceeded"))


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _write_checkpoint(ctx: Any, root: Path, tmp: Path, final: Path) -> None:
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    ctx.engine.save_checkpoint(str(tmp), tag=STATE_TAG, save_latest=False)
    save_safetensors(_rng_state(), tmp / f"rng-rank{ctx.rank}.safetensors")
    if ctx.is_main:
        if ctx.ema is not None:
            save_safetensors(ctx.ema.state_dict(), tmp / EMA_STATE, file_metadata(ctx))
        # the method's and callbacks' own state goes in before the rename, so it is never missing
        save_states(tmp / "state", ctx.method, ctx.callbacks)
        state = {
            "format": FORMAT,
            "step": ctx.step,
            "sampler": ctx.sampler.state_dict(),
            "world_size": ctx.world_size,
            "zero_stage": ctx.job.train.deepspeed.zero_stage,
            "job": ctx.job.name,
            "seed": ctx.job.seed,
            "versions": ctx.versions,
        }
        (tmp / "trainer.json.tmp").write_text(json.dumps(state, indent=2))
    export_weights(ctx, tmp)
    if ctx.ema is not None:
        export_ema(ctx, tmp)
    barrier()
    if ctx.is_main:
        # trainer.json is the completeness marker: written last, then the folder renamed at once
        os.replace(tmp / "trainer.json.tmp", tmp / "trainer.json")
        write_manifest(tmp)
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(ctx.output_dir, ctx.job.train.keep_last)
    barrier()


def prune(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(output_dir: Path) -> None:
    """Remove half-written checkpoints a crash left behind."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-step-"):
                shutil.rmtree(child, ignore_errors=True)


def checkpoint_damage(path: Path, *, uses_ema: bool) -> list[str]:
    """What is damaged in the checkpoint at ``path`` (empty when it is intact or predates manifests)."""
    try:
        state = json.loads((path / "trainer.json").read_text())
        if not isinstance(state, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return [f"trainer.json: unreadable ({type(exc).__name__})"]
    if state.get("format", 1) < FORMAT and not (path / MANIFEST).exists():
        return []  # written before checkpoints carried a manifest: nothing to check against
    return damage(path, unused=() if uses_ema else _ema_files(path))


def _ema_files(path: Path) -> tuple[str, ...]:
    """The EMA's files the manifest of ``path`` lists (what a job without an EMA does not need)."""
    try:
        entries = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return ()
    return tuple(rel for rel in entries if "/" not in rel and rel.startswith("ema") and rel.endswith(".safetensors"))


def resume_checkpoint(output_dir: Path, *, uses_ema: bool, rank: int) -> Path | None:
    """The newest intact checkpoint (rank 0 checks, every rank gets its answer), or None if there is
    none at all. Damaged ones are named on stderr and skipped; if every one is damaged, a UserError
    names the damaged files."""
    found = list_checkpoints(output_dir)
    chosen, damaged = -1, []
    if rank == 0:
        for step, path in reversed(found):
            problems = checkpoint_damage(path, uses_ema=uses_ema)
            if not problems:
                chosen = step
                break
            damaged.append((path, problems))
        for path, problems in damaged:
            fallback = f"resuming from step-{chosen}" if chosen >= 0 else "no intact checkpoint is left"
            print(f"diffcore: warning: checkpoint {path} is damaged ({'; '.join(problems[:4])}); {fallback}",
                  file=sys.stderr, flush=True)
        if chosen < 0 and found:
            chosen = -2
    chosen = broadcast_int(chosen)
    if chosen == -2:
        names = "; ".join(f"{p.name}: {', '.join(problems[:3])}" for p, problems in damaged) or "see rank 0"
        raise UserError(
            f"every checkpoint is damaged: {names}",
            where=str(checkpoint_root(output_dir)),
            hint="restore the files from a backup, or move the checkpoints away to start over",
        )
    return None if chosen < 0 else checkpoint_root(output_dir) / f"step-{chosen}"


def saved_layout(path: Path, job: Any) -> tuple[int, int]:
    """(world size, ZeRO stage) the checkpoint at ``path`` was written with."""
    state = json.loads((path / "trainer.json").read_text())
    return int(state["world_size"]), int(state.get("zero_stage", job.train.deepspeed.zero_stage))


def load_checkpoint(ctx: Any, path: Path, *, universal: bool = False) -> None:
    """Restore the engine, optimizer, lr schedule, data position, RNG and EMA from ``path``.

    With ``universal`` (the world size changed under ZeRO) the DeepSpeed state is first converted to
    DeepSpeed's universal checkpoint on rank 0, then re-partitioned by the engine for this world size.
    """
    state = json.loads((path / "trainer.json").read_text())
    use_safe_loading(ctx.engine)
    if universal:
        work = ctx.output_dir / f".reshard-{path.name}"
        if ctx.is_main:
            convert(path / STATE_TAG, work)
        barrier()
        try:
            with weights_only_loading():
                load_path, _ = ctx.engine.load_checkpoint(
                    str(work), tag=UNIVERSAL_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        finally:
            barrier()
            if ctx.is_main:
                shutil.rmtree(work, ignore_errors=True)
    else:
        load_path, _ = ctx.engine.load_checkpoint(
            str(path), tag=STATE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise UserError("the DeepSpeed state in this checkpoint could not be loaded", where=str(path))
    ctx.step = int(state["step"])
    try:
        ctx.sampler.load_state_dict(state["sampler"])
    except ValueError as exc:
        raise UserError(str(exc), where=str(path)) from None
    rng_file = path / f"rng-rank{ctx.rank}.safetensors"
    if rng_file.exists():
        _set_rng_state(load_file(str(rng_file)))
    elif state["world_size"] == ctx.world_size:
        raise UserError(f"the checkpoint has no RNG state for rank {ctx.rank}", where=str(path),
                        hint="restore the file from a backup, or resume from an older checkpoint")
    if ctx.ema is not None:
        ema_file = path / EMA_STATE
        if not ema_file.exists() and (path / "ema.safetensors").exists() and not is_ema_export(path / "ema.safetensors"):
            ema_file = path / "ema.safetensors"  # a checkpoint from before the export: the state under this name
        if not ema_file.exists():
            raise UserError(
                "the checkpoint has no EMA weights, but the job sets train.ema_decay",
                where=str(path),
                hint="remove train.ema_decay to resume this run, or start a new run to train with an EMA",
            )
        ctx.ema.load_state_dict(load_file(str(ema_file)))
    load_states(path / "state", ctx.method, ctx.callbacks)
