"""Block swap (``train.blocks_to_swap``, ``diffcore sample --blocks-to-swap``): the frozen weights of
the backbone's last N repeated blocks live in (pinned) host memory and visit the compute device one
block at a time.

Which blocks: the last N of ``model.repeated_blocks()`` counted over all its lists in order. The
resident blocks in front then compute while the first swapped block is copied in, and the last
block's forward is followed at once by its backward, so it stays on the device across that turn.

Where they start: ``diffcore run`` holds them on the host through its ``model.to(device)``
(:func:`hold_on_host`) and swaps them once the adapter is attached (:func:`swap_for_training`);
``diffcore sample`` swaps them before it moves the model. Either way the swapped weights never sit
on the device together. A model already on the device arms the swap at its first swapped forward.

How (plain module hooks on each swapped block, outside any compiled block forward):

- forward pre-hook: the block's weights are made resident (waiting for their prefetch) and the next
  swapped block is prefetched on a side CUDA stream (events order the two streams; on CPU the same
  code copies synchronously). Inputs are passed through an identity autograd function whose backward
  marks the end of this block's backward.
- forward hook: the block is released; gradient hooks on its outputs bring it back before its
  backward starts and prefetch the block before it. Autograd saved views of the weights keep the
  device storage object, whose memory is freed (resized to 0) while offloaded and refilled in place,
  so the saved tensors see the weights again. A forward recomputed by activation checkpointing runs
  the pre-hook like any other and keeps the block until its backward is over.
- released: each tensor's ``.data`` is an empty placeholder of its dtype on the device (a stray read
  fails with a shape error) and its storage holds no memory. A cast of the placeholders (DeepSpeed's
  bf16/fp16) is followed by the host copies.

Trainable parameters (adapter branches) are never moved. ``state_dict()`` of a swapped block gives
the host copies; ``load_state_dict`` refreshes them.

Assumptions: a swapped block's frozen weights are not changed in place while swapped (the host copy
is the truth); a block's backward uses its weights only on paths that reach its inputs (true of
every diffcore backbone; an adapter-only branch through a second frozen layer would break it); and
for bit-exact gradients a block adds its residual itself (one added outside would sum the input's
gradient contributions in another order, equal up to rounding).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from diffcore.errors import UserError

WHERE = "$.train.blocks_to_swap"


class _Tensor:
    """One swapped tensor: the module's own tensor object, its host copy and its device buffer (the
    last four are set when the swap arms)."""

    __slots__ = ("tensor", "names", "host", "device", "storage", "nbytes", "placeholder")
    host: torch.Tensor
    device: torch.Tensor
    storage: Any
    nbytes: int
    placeholder: torch.Tensor

    def __init__(self, tensor: torch.Tensor, names: list[str]):
        self.tensor = tensor
        self.names = names


class _Block:
    __slots__ = (
        "index",
        "name",
        "module",
        "tensors",
        "resident",
        "ready",
        "active",
        "started",
        "calls",
        "handles",
    )

    def __init__(self, index: int, name: str, module: nn.Module, tensors: list[_Tensor]):
        self.index = index
        self.name = name
        self.module = module
        self.tensors = tensors
        self.resident = True
        self.ready: Any = None  # the CUDA event of a copy still in flight
        self.active = False  # its backward is pending (recomputed for it) or running: keep it
        self.started = False  # its backward began
        self.calls = 0  # forwards (with gradients) whose backward has not ended
        self.handles: list[Any] = []


class _EndOfBackward(torch.autograd.Function):
    """Identity on a block's inputs; its backward runs once every gradient into them is computed,
    which is when the block's own backward is over."""

    @staticmethod
    def forward(ctx: Any, swap: BlockSwap, block: _Block, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.swap, ctx.block = swap, block
        return inputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        ctx.swap._backward_done(ctx.block)
        return (None, None, *grads)


def _host_buffer(shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Pinned host memory (what an asynchronous copy to the GPU needs), or pageable memory where the
    system will not pin that much: the copies then wait for the host, the results are the same."""
    if pin:
        try:
            return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(shape, dtype=dtype, device="cpu")


def block_count(model: Any) -> int:
    """How many repeated blocks ``model`` declares (over all its ``repeated_blocks()`` lists)."""
    return len(_declared_blocks(model.backbone, model.repeated_blocks()))


def _declared_blocks(backbone: nn.Module, paths: Sequence[str]) -> list[tuple[str, nn.Module]]:
    blocks: list[tuple[str, nn.Module]] = []
    for path in paths:
        container = backbone.get_submodule(path)
        blocks += [(f"{path}.{i}", block) for i, block in enumerate(container.children())]
    return blocks


class BlockSwap:
    """The swapped blocks of one backbone and the hooks that move them; see the module docstring."""

    def __init__(self, blocks: Sequence[tuple[str, nn.Module, list[_Tensor]]], device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = [_Block(i, name, module, tensors) for i, (name, module, tensors) in enumerate(blocks)]
        self.armed = False
        #: the most swapped blocks that held their weights on the device at one time
        self.max_resident = 0
        self._order: list[_Block] = list(self.blocks)  # the execution order, learned from each forward
        self._position = {id(b): i for i, b in enumerate(self._order)}
        self._current: list[_Block] = []
        self._prefetch: _Block | None = None
        self._callback_queued = False
        self._stream: Any = torch.cuda.Stream(self.device) if self.cuda else None
        for b in self.blocks:
            b.handles = [
                b.module.register_forward_pre_hook(self._hook_pre_forward(b), with_kwargs=True),
                b.module.register_forward_hook(self._hook_forward(b)),
                b.module.register_state_dict_post_hook(self._hook_state_dict(b)),
                b.module.register_load_state_dict_pre_hook(self._hook_load_pre(b)),
                b.module.register_load_state_dict_post_hook(self._hook_load_post(b)),
            ]

    # -- public ----------------------------------------------------------------------------------
    def arm(self) -> None:
        """Copy the swapped weights to host memory and free their device copies (the first swapped
        forward does it, after DeepSpeed has cast and broadcast the weights)."""
        if self.armed:
            return
        pin = self.cuda and torch.cuda.is_available()
        for b in self.blocks:
            for t in b.tensors:
                data = t.tensor.data
                t.host = _host_buffer(data.shape, data.dtype, pin)
                t.host.copy_(data)
                # a buffer of its own (the loaded tensor may be a view into a shared one), freed at once
                t.device = torch.empty(data.shape, dtype=data.dtype, device=self.device)
                t.storage = t.device.untyped_storage()
                t.nbytes = t.storage.nbytes()
                t.storage.resize_(0)
                t.placeholder = torch.empty(0, dtype=data.dtype, device=self.device)
                t.tensor.data = t.placeholder
                del data
            b.resident = False
        self.armed = True

    def resident(self) -> list[str]:
        """The swapped blocks whose weights are on the device now (by path)."""
        return [b.name for b in self.blocks if b.resident]

    def remove(self) -> None:
        """Bring every swapped weight back onto the device for good and remove the hooks."""
        for b in self.blocks:
            if self.armed:
                self._ensure(b)
            for handle in b.handles:
                handle.remove()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        self.blocks, self._order = [], []

    # -- moving ----------------------------------------------------------------------------------
    def _load(self, b: _Block) -> None:
        """Start copying ``b``'s weights in (asynchronously on CUDA)."""
        if b.resident:
            return
        for t in b.tensors:
            if t.tensor.dtype != t.host.dtype:
                self._recast(t)
            # allocated on the compute stream: the copy waits for what that stream queued before
            t.storage.resize_(t.nbytes)
        if self._stream is not None:
            compute = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(compute)
            with torch.cuda.stream(self._stream):
                for t in b.tensors:
                    t.device.copy_(t.host, non_blocking=True)
                b.ready = torch.cuda.Event()
                b.ready.record(self._stream)
        else:
            for t in b.tensors:
                t.device.copy_(t.host)
        for t in b.tensors:
            t.tensor.data = t.device
        b.resident = True
        self.max_resident = max(self.max_resident, sum(x.resident for x in self.blocks))

    def _recast(self, t: _Tensor) -> None:
        """Follow a cast of the offloaded tensor (DeepSpeed's bf16/fp16 cast replaces every
        parameter's ``.data``, placeholders included): the host copy takes the new dtype."""
        dtype = t.tensor.dtype
        host = _host_buffer(t.host.shape, dtype, t.host.is_pinned())
        host.copy_(t.host)
        t.host = host
        t.device = torch.empty(t.host.shape, dtype=dtype, device=self.device)
        t.storage = t.device.untyped_storage()
        t.nbytes = t.storage.nbytes()
        t.storage.resize_(0)
        t.placeholder = t.tensor.data

    def _ensure(self, b: _Block) -> None:
        self._load(b)
        if b.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(b.ready)
            b.ready = None

    def _release(self, b: _Block) -> None:
        if not b.resident:
            return
        if b.ready is not None:  # a prefetch never used: its copy must land before the memory is reused
            torch.cuda.current_stream(self.device).wait_event(b.ready)
            b.ready = None
        for t in b.tensors:
            t.tensor.data = t.placeholder
            t.storage.resize_(0)
        b.resident = False

    def _evict(self, *keep: _Block | None) -> None:
        """Release every resident block but ``keep``, the pending prefetch and blocks mid-backward."""
        for b in self.blocks:
            if b.resident and not b.active and b is not self._prefetch and all(b is not k for k in keep):
                self._release(b)

    def _prefetch_block(self, b: _Block | None) -> None:
        self._prefetch = b
        if b is not None:
            self._load(b)

    # -- order -----------------------------------------------------------------------------------
    def _track(self, b: _Block) -> None:
        """Learn the execution order: a block seen again starts the next forward."""
        if any(x is b for x in self._current):
            self._order = self._current
            self._position = {id(x): i for i, x in enumerate(self._order)}
            self._current = []
        self._current.append(b)

    def _neighbour(self, b: _Block, step: int, wrap: bool) -> _Block | None:
        i = self._position.get(id(b))
        if i is None or not self._order:
            return None
        j = i + step
        if 0 <= j < len(self._order):
            return self._order[j]
        return self._order[j % len(self._order)] if wrap and len(self._order) > 1 else None

    # -- hooks -----------------------------------------------------------------------------------
    def _hook_pre_forward(self, b: _Block) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self.armed:
                self.arm()
            backward = torch._C._current_graph_task_id() != -1
            grad = torch.is_grad_enabled()
            if backward:
                # the forward recomputed by activation checkpointing: its saved tensors (parameters
                # among them) must stay real until the block's backward has run
                b.active = True
                self._evict(b)
                self._ensure(b)
            else:
                self._track(b)
                # inference wraps around to the first block of the next call; training turns to backward
                nxt = self._neighbour(b, 1, wrap=not grad)
                self._evict(b, nxt)
                self._ensure(b)
                self._prefetch_block(nxt)
            if not grad:
                return None
            flat, spec = pytree.tree_flatten((args, kwargs))
            where = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]
            if not where:
                return None
            if not backward:  # a recomputed forward's graph is never back-propagated
                b.calls += 1
            aliased = _EndOfBackward.apply(self, b, *(flat[i] for i in where))
            for i, x in zip(where, aliased):
                flat[i] = x
            return pytree.tree_unflatten(flat, spec)

        return hook

    def _hook_forward(self, b: _Block) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs = [
                x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.requires_grad
            ]
            for x in outputs:
                x.register_hook(self._hook_pre_backward(b))
            # recomputed in backward: active until its backward is over; the last block's backward
            # comes right after its forward
            if not b.active and not (outputs and b is self._order[-1]):
                self._release(b)

        return hook

    def _hook_pre_backward(self, b: _Block) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if not self._callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
                self._callback_queued = True
            if b.started:  # another output of the block, or another call of it
                self._ensure(b)
                return
            b.started = b.active = True
            before = self._neighbour(b, -1, wrap=False)
            self._evict(b, before)
            self._ensure(b)
            self._prefetch_block(before)

        return hook

    def _backward_done(self, b: _Block) -> None:
        b.calls -= 1
        if b.calls > 0:  # a block called twice in one forward: the other call's backward is to come
            return
        b.active = b.started = False
        if b is not self._prefetch:
            self._release(b)

    def _end_backward(self) -> None:
        self._callback_queued = False
        for b in self.blocks:
            b.active = b.started = False
            b.calls = 0
        # the next forward starts with the first swapped block: keep it if it is here
        first = self._order[0] if self._order else None
        self._prefetch = None
        self._evict(first)

    def _hook_state_dict(self, b: _Block) -> Any:
        def hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
            if not self.armed:
                return
            for t in b.tensors:
                if not b.resident and t.tensor.dtype != t.host.dtype:
                    self._recast(t)
                for name in t.names:
                    if prefix + name in state:
                        state[prefix + name] = t.host

        return hook

    def _hook_load_pre(self, b: _Block) -> Any:
        def hook(module: nn.Module, *args: Any) -> None:
            if self.armed:
                self._ensure(b)

        return hook

    def _hook_load_post(self, b: _Block) -> Any:
        def hook(module: nn.Module, incompatible: Any) -> None:
            if not self.armed:
                return
            for t in b.tensors:
                t.host.copy_(t.device)
            self._release(b)

        return hook


def _swappable(
    backbone: nn.Module, blocks: Sequence[tuple[str, nn.Module]], trainable_ok: set[int], where: str
) -> list[tuple[str, nn.Module, list[_Tensor]]]:
    """Each block's frozen parameters and buffers that no other module shares."""
    owner: dict[int, int] = {}  # module id -> block index
    for i, (_, block) in enumerate(blocks):
        for module in block.modules():
            owner.setdefault(id(module), i)
    holders: dict[int, set[int]] = {}  # tensor id -> the blocks (-1: outside) holding it
    for module in backbone.modules():
        for tensor in _own_tensors(module):
            holders.setdefault(id(tensor), set()).add(owner.get(id(module), -1))
    out = []
    for i, (name, block) in enumerate(blocks):
        found: dict[int, _Tensor] = {}
        for tname, tensor in [
            *block.named_parameters(remove_duplicate=False),
            *block.named_buffers(remove_duplicate=False),
        ]:
            if tensor.requires_grad:
                if id(tensor) not in trainable_ok:
                    raise UserError(
                        f"block {name} trains its own weights ({tname}): block swap moves frozen weights only",
                        where=where,
                        hint="train an adapter (lora, dora, lokr), or for a full finetune use "
                        "train.deepspeed.zero_stage: 3 with offload_params: true instead",
                    )
                continue
            if (
                holders.get(id(tensor), {i}) != {i}
                or tensor.numel() == 0
                or type(tensor.data) is not torch.Tensor
                or type(tensor) not in (torch.Tensor, nn.Parameter)
            ):
                # tied to another module, or a quantised tensor subclass (torchao's, which model.quantize
                # loads) or parameter subclass whose extra state would not follow: it stays on the device
                continue
            if id(tensor) in found:
                found[id(tensor)].names.append(tname)
            else:
                found[id(tensor)] = _Tensor(tensor, [tname])
        out.append((name, block, list(found.values())))
    return out


def _own_tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from (p for p in module._parameters.values() if p is not None)
    yield from (b for b in module._buffers.values() if b is not None)


def swap_blocks(
    model: Any,
    count: int,
    device: torch.device | str,
    *,
    trainable: Iterable[torch.Tensor] = (),
    where: str = WHERE,
    arm: bool = False,
) -> BlockSwap | None:
    """Swap the frozen weights of the last ``count`` of ``model``'s repeated blocks (see the module
    docstring). ``trainable``: parameters allowed to train inside swapped blocks (the adapter's);
    any other trainable parameter there is refused. ``arm``: move the weights to host memory now
    (the model may still be on the CPU: the swapped weights then never visit the device together);
    otherwise the first swapped forward does. None when ``count`` is 0."""
    if count == 0:
        return None
    chosen = _chosen(model, count, where)
    swap = BlockSwap(
        _swappable(model.backbone, chosen, {id(p) for p in trainable}, where), torch.device(device)
    )
    if arm:
        swap.arm()
    return swap


class HeldBlocks:
    """The blocks :func:`hold_on_host` kept off the device, until :func:`swap_for_training` swaps them."""

    def __init__(self, count: int, blocks: list[tuple[str, nn.Module]]):
        self.count = count
        self.blocks = blocks
        for _, block in blocks:
            # nn.Module.to (and .cuda, .half...) reaches each child through its _apply: this
            # instance's does nothing, so the loop's model.to(device) leaves the block on the host
            _HELD.add(block)
            block._apply = types.MethodType(_stay, block)  # type: ignore[method-assign]

    def release(self) -> None:
        for _, block in self.blocks:
            _HELD.discard(block)
            del block._apply


#: the blocks held now (a deep copy of one, e.g. a ControlNet trunk's, is not: it moves as usual)
_HELD: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _stay(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    if module in _HELD:
        return module
    return nn.Module._apply(module, fn, recurse)


def _check_training(train: Any) -> None:
    if train.deepspeed.zero_stage == 3:
        raise UserError(
            "block swap cannot move weights that ZeRO-3 partitions",
            where=WHERE,
            hint="set it to 0 and use train.deepspeed.offload_params: true, or use zero_stage 0-2",
        )


def hold_on_host(job: Any, model: Any) -> HeldBlocks | None:
    """``train.blocks_to_swap`` in the loop, first part, before the model moves to the device: the
    blocks to swap stay on the host (the adapter then attaches to them there), so their weights
    never sit on the device together. Bad counts fail here, before anything moves."""
    count = job.train.blocks_to_swap
    if count == 0:
        return None
    _check_training(job.train)
    return HeldBlocks(count, _chosen(model, count, WHERE))


def swap_for_training(ctx: Any, held: HeldBlocks | None = None) -> BlockSwap | None:
    """``train.blocks_to_swap`` in the loop, second part: after the adapter is attached and the
    trainable parameters are chosen, before DeepSpeed. The held blocks' trainable parameters (the
    adapter's) go to the device; their frozen weights to pinned host memory."""
    train = ctx.job.train
    if train.blocks_to_swap == 0:
        return None
    _check_training(train)
    trainable = ctx.adapter_params or ()
    if held is None:  # the model is on the device already: the first swapped forward arms the swap
        return swap_blocks(ctx.model, train.blocks_to_swap, ctx.device, trainable=trainable)
    held.release()
    device = torch.device(ctx.device)
    import torch.distributed as dist

    synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for _, block in held.blocks:
        for tensor in [*block.parameters(), *block.buffers()]:
            if tensor.requires_grad:
                tensor.data = tensor.data.to(device)
            elif synced:  # as DeepSpeed's start-up broadcast would (a randomly initialised model)
                buffer = tensor.data.to(device)
                dist.broadcast(buffer, 0)
                tensor.data.copy_(buffer)
    return swap_blocks(ctx.model, train.blocks_to_swap, device, trainable=trainable, arm=True)


def _chosen(model: Any, count: int, where: str) -> list[tuple[str, nn.Module]]:
    paths = model.repeated_blocks()
    if not paths:
        raise UserError(
            f"{model.architecture or type(model).__name__} declares no repeated blocks to swap",
            where=where,
            hint="set it to 0 for this model",
        )
    blocks = _declared_blocks(model.backbone, paths)
    if count > len(blocks):
        raise UserError(
            f"{count} blocks to swap, but the model has {len(blocks)} repeated blocks ({', '.join(paths)})",
            where=where,
            hint=f"use at most {len(blocks)}",
        )
    return blocks[len(blocks) - count :]


def swap_for_sampling(
    model: Any, count: int, device: torch.device | str, dtype: torch.dtype | None = None
) -> BlockSwap | None:
    """``diffcore sample --blocks-to-swap``: called while the model is still on the CPU, before it
    moves to ``device``, so the swapped weights go to host memory first and never sit on the device
    together. The backbone is cast to ``dtype`` here (on the CPU) for the same reason."""
    where = "--blocks-to-swap"
    if count < 0:
        raise UserError(f"must be at least 0, got {count}", where=where)
    if count == 0:
        return None
    if dtype is not None:
        model.backbone.to(dtype=dtype)
    # nothing trains while sampling: an adapter's parameters simply stay on the device
    keep = [p for p in model.backbone.parameters() if p.requires_grad]
    return swap_blocks(model, count, device, trainable=keep, where=where, arm=True)
