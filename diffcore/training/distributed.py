"""Process-group setup: one code path for a single process, torchrun and the deepspeed launcher."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import attrs
import torch


@attrs.frozen
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


_SOLO = "DIFFCORE_SOLO_PID"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str = "auto", timeout_s: float = 1800.0, num_threads: int | None = None) -> Dist:
    """Initialise torch.distributed (gloo on CPU, nccl on CUDA) through DeepSpeed, once.

    Without a launcher the process becomes rank 0 of a world of one. ``timeout_s`` bounds every
    collective: a rank that waits longer on a stopped or stuck peer fails instead of hanging.
    ``num_threads`` sets the intra-op threads (see :func:`threads_per_process`).
    """
    # A world of one that a diffcore parent process set up is not ours to join: a child process
    # (a subprocess run, a sampler) would knock on the parent's rendezvous port.
    solo = os.environ.get(_SOLO)
    inherited = solo is not None and solo != str(os.getpid()) and os.environ.get("WORLD_SIZE") == "1"
    own_port = "RANK" not in os.environ or inherited
    if own_port:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            **{_SOLO: str(os.getpid())},
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as td

    backend = "gloo" if device.type == "cpu" else "nccl"
    _default_group_timeout(timedelta(seconds=timeout_s))
    for attempt in range(5):
        if td.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))
        except td.DistNetworkError:
            # the port we picked was taken between picking and binding: pick another (single process)
            if not own_port or attempt == 4:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
    world = td.get_world_size()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads_per_process(num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(rank=td.get_rank(), local_rank=local_rank, world_size=world, device=device)


def threads_per_process(configured: int | None, local_processes: int) -> int:
    """Intra-op threads: ``train.num_threads`` when set, else ``$OMP_NUM_THREADS`` when the user (or
    torchrun, which sets 1) set it, else the physical cores this process may use shared among the
    processes on this machine. More threads than free cores make a shared CPU far slower, not faster."""
    if configured:
        return configured
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, physical_cores() // max(1, local_processes))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu, package = None, "0"
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu, package = int(value), "0"
                elif key == "physical id":
                    package = value
                elif key == "core id" and cpu in allowed:
                    cores.add((package, value))
    except (OSError, ValueError):
        pass
    return len(cores) or len(allowed) or 1


def _default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the default of every process group, not only the world group.

    DeepSpeed builds its data-parallel groups with ``new_group()`` and no timeout, which takes
    torch's module-level default (30 min for gloo, 10 for NCCL) whatever the world group was given:
    a rank stuck in a gradient all-reduce would wait that long. torch reads these two defaults at
    each ``new_group`` call, so setting them here covers the groups DeepSpeed makes later.
    """
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def barrier() -> None:
    import torch.distributed as td

    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL reduces only CUDA tensors (on this rank's
    device), gloo only CPU ones."""
    import torch.distributed as td

    if td.is_initialized() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world() -> int:
    import torch.distributed as td

    return td.get_world_size() if td.is_initialized() else 1


def all_mean_tensor(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks of a tensor on any device (returned on the same device)."""
    if _world() == 1:
        return values
    import torch.distributed as td

    t = values.detach().to(collective_device(), torch.float64)
    td.all_reduce(t)
    return (t / td.get_world_size()).to(values.device)


def all_min_tensor(values: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum over ranks (returned on the same device)."""
    if _world() == 1:
        return values
    import torch.distributed as td

    t = values.detach().to(collective_device(), torch.float64)
    td.all_reduce(t, op=td.ReduceOp.MIN)
    return t.to(values.device)


def all_mean(value: float) -> float:
    """Mean of a float over ranks."""
    if _world() == 1:
        return value
    return float(all_mean_tensor(torch.tensor([value], dtype=torch.float64)).item())


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    if _world() == 1:
        return flag
    import torch.distributed as td

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device())
    td.all_reduce(t, op=td.ReduceOp.MIN)
    return bool(t.item())


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    if _world() == 1:
        return value
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.int64, device=collective_device())
    td.broadcast(t, src=0)
    return int(t.item())


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that gave up waiting (gloo and NCCL word it differently)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in ("timed out", "timeout", "connection closed by peer"))
