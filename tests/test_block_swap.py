"""Block swap (train.blocks_to_swap): training with the last N blocks' frozen weights swapped in and out
gives the same losses, gradients and weights, bit for bit in fp32, as without (DiT, SD1.5-, Flux.1-,
SD3- and Flux.2-shaped backbones); at most two swapped blocks hold real weights at once; bad counts
are one-line errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import diffcore
from diffcore.errors import UserError
from diffcore.model import DiffusionModel
from diffcore.training.block_swap import block_count, swap_blocks

pytest.importorskip("diffcore_lora")

DIT = dict(hidden_size=32, depth=5, num_heads=2, patch_size=4, in_channels=3, input_size=8, num_classes=4)
FLUX = dict(
    load_encoders=False, hidden_size=32, num_heads=2, depth=3, depth_single=3, axes_dim=[4, 6, 6],
    in_channels=16, vec_in_dim=16, context_in_dim=16,
)  # fmt: skip
SD15 = dict(
    load_encoders=False,
    unet=dict(
        block_out_channels=[8, 16], attention=[True, True], transformer_layers=[2, 1], heads=[2, 2],
        cross_attention_dim=16, norm_groups=4, layers_per_block=1,
    ),
)  # fmt: skip


SD3 = dict(
    load_encoders=False, variant="medium", hidden_size=32, num_heads=2, depth=4, in_channels=4, pooled_dim=16,
    context_dim=16, pos_embed_max_size=8, sample_size=8, qk_norm=True, dual_attention_layers=[0, 1],
)  # fmt: skip
FLUX2 = dict(
    load_encoders=False, variant="dev",
    shape=dict(hidden_size=32, num_heads=2, depth=2, depth_single=3, axes_dim=[4, 4, 4, 4], in_channels=16,
               context_in_dim=48),
)  # fmt: skip


def _inputs(arch: str, step: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(100 + step)
    if arch == "sd3":
        return (
            torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.7]), torch.randn(2, 5, 16, generator=g),
            torch.randn(2, 16, generator=g),
        )  # fmt: skip
    if arch == "flux2":
        ids, text_ids = torch.zeros(6, 4), torch.zeros(4, 4)
        ids[:, 1], text_ids[:, 3] = torch.arange(6.0), torch.arange(4.0)
        return (
            torch.randn(2, 6, 16, generator=g), ids, torch.randn(2, 4, 48, generator=g), text_ids,
            torch.tensor([0.3, 0.7]), torch.tensor([1.0, 2.0]),
        )  # fmt: skip
    if arch == "dit":
        return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3.0, 700.0]), torch.tensor([1, 3])
    if arch == "sd15":
        return (
            torch.randn(2, 4, 8, 8, generator=g),
            torch.tensor([5.0, 900.0]),
            torch.randn(2, 5, 16, generator=g),
        )
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(3.0), indexing="ij"), -1
    )
    return (
        torch.randn(2, 6, 16, generator=g), img_ids.reshape(6, 3), torch.randn(2, 4, 16, generator=g),
        torch.zeros(4, 3), torch.tensor([0.3, 0.8]), torch.randn(2, 16, generator=g), torch.tensor([1.0, 3.5]),
    )  # fmt: skip


def _model(arch: str) -> Any:
    torch.manual_seed(0)
    options = {"dit": DIT, "flux": FLUX, "sd15": SD15, "sd3": SD3, "flux2": FLUX2}[arch]
    model = diffcore.load_model(arch, **options)
    with torch.no_grad():  # larger than the zero-initialised gates so every block moves the output
        for p in model.backbone.parameters():
            p.normal_(0.0, 0.2)
    return model


def _adapter(model: Any, kind: str) -> list[torch.nn.Parameter]:
    from diffcore.api import build_component, component_config

    options = {"rank": 2} if kind != "lokr" else {"rank": 2, "factor": 2}
    adapter = build_component("adapter", kind, component_config("adapter", kind, options))
    params = list(adapter.attach(model))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # LoRA's up starts at zero: give every branch a gradient from the first step
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return params


def _train(arch: str, swap: int, *, adapter: str | None = "lora", checkpointing: bool = False, steps: int = 2,
           observe: Callable[[Any, Any], None] | None = None, device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    model = _model(arch)
    model.backbone.to(device)
    if adapter is not None:
        params = _adapter(model, adapter)
    else:  # everything but the blocks that may be swapped trains
        swappable = {
            id(p) for name, _ in _blocks(model)[-3:] for p in model.backbone.get_submodule(name).parameters()
        }
        model.backbone.requires_grad_(True)
        params = [p for p in model.backbone.parameters() if id(p) not in swappable]
        for p in model.backbone.parameters():
            p.requires_grad_(id(p) not in swappable)
    model.set_gradient_checkpointing(checkpointing)
    swapper = swap_blocks(model, swap, device, trainable=params)
    if observe is not None:
        observe(model, swapper)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses, grads = [], []
    for step in range(steps):
        out = model.backbone(*_on(device, _inputs(arch, step)))
        loss = out.float().square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.cpu() for p in params])
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        inference = model.backbone(*_on(device, _inputs(arch, 9))).cpu()
    state = {k: v.cpu().clone() for k, v in model.backbone.state_dict().items()}
    return {"losses": [x.cpu() for x in losses], "grads": grads, "weights": [p.detach().cpu() for p in params],
            "swap": swapper, "inference": inference, "state": state}  # fmt: skip


def _on(device: str, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.to(device) for x in inputs)


def _blocks(model: Any) -> list[tuple[str, torch.nn.Module]]:
    return [
        (f"{path}.{i}", block)
        for path in model.repeated_blocks()
        for i, block in enumerate(model.backbone.get_submodule(path))
    ]


def _assert_same(plain: dict[str, Any], swapped: dict[str, Any]) -> None:
    assert all(torch.equal(a, b) for a, b in zip(plain["losses"], swapped["losses"])), (
        plain["losses"],
        swapped["losses"],
    )
    for step, (a, b) in enumerate(zip(plain["grads"], swapped["grads"])):
        bad = [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)]
        assert not bad, f"step {step}: {len(bad)} of {len(a)} gradients differ"
        assert any(g.abs().sum() > 0 for g in b)
    assert all(torch.equal(a, b) for a, b in zip(plain["weights"], swapped["weights"]))
    assert torch.equal(plain["inference"], swapped["inference"])
    # the state dict gives the swapped blocks' real weights (from their host copies)
    assert plain["state"].keys() == swapped["state"].keys()
    assert all(torch.equal(plain["state"][k], swapped["state"][k]) for k in plain["state"])


@pytest.mark.parametrize(
    ("arch", "adapter", "checkpointing"),
    [
        ("dit", "lora", False),
        ("dit", "lora", True),
        ("dit", "dora", True),
        ("dit", None, False),
        ("sd15", "lora", False),
        ("sd15", "lora", True),
        ("flux", "lora", False),
        ("flux", "lokr", True),
        ("sd3", "lora", True),  # MMDiT-X: dual attention, qk norm
        ("flux2", "lora", False),  # modulation shared by every block, computed outside them
    ],
)
def test_swap_is_exact(arch, adapter, checkpointing):
    plain = _train(arch, 0, adapter=adapter, checkpointing=checkpointing)
    swapped = _train(arch, 3, adapter=adapter, checkpointing=checkpointing)
    _assert_same(plain, swapped)
    swap = swapped["swap"]
    assert len(swap.blocks) == 3 and swap.armed
    assert [b.name for b in swap.blocks] == [name for name, _ in _blocks(_model(arch))][-3:]
    # between steps at most the first swapped block stays on the device (the next forward starts with it)
    assert len(swap.resident()) <= 1


def _materialised(block: torch.nn.Module) -> bool:
    frozen = [p for p in block.parameters() if not p.requires_grad]
    return all(p.numel() > 0 for p in frozen) and all(p.untyped_storage().nbytes() > 0 for p in frozen)


@pytest.mark.parametrize(
    ("arch", "checkpointing"), [("dit", False), ("dit", True), ("flux", True), ("sd15", True)]
)
def test_at_most_two_swapped_blocks_hold_weights_at_once(arch, checkpointing):
    """Forward hooks (which also run in the recomputed forward of checkpointing) and gradient hooks on
    each block's outputs (run as its backward starts) count the swapped blocks whose weights are real
    on the device; offloaded ones hold an empty placeholder and a storage of 0 bytes."""
    seen: list[int] = []
    events: list[str] = []

    def observe(model: Any, swap: Any) -> None:
        blocks = [b.module for b in swap.blocks]

        def count(phase: str, name: str) -> None:
            seen.append(sum(_materialised(b) for b in blocks))
            events.append(f"{phase} {name}")

        for b in swap.blocks:

            def forward(module, args, output, name=b.name):
                count("forward", name)
                assert _materialised(module)  # the block ran with its real weights

            def backward(module, args, output, name=b.name):  # after the swap's own hooks
                for x in torch.utils._pytree.tree_leaves(output):
                    if isinstance(x, torch.Tensor) and x.requires_grad:
                        x.register_hook(lambda grad, name=name, module=module: check(module, name))

            def check(module, name):
                count("backward", name)
                assert _materialised(module)

            b.module.register_forward_hook(forward, prepend=True)  # before the swap releases it
            b.module.register_forward_hook(backward)
        assert sum(_materialised(b) for b in blocks) == 4  # armed only by the first forward
        assert all(p.numel() > 0 for b in blocks for p in b.parameters() if p.requires_grad)

    result = _train(arch, 4, checkpointing=checkpointing, steps=2, observe=observe)
    swap = result["swap"]
    assert len(swap.blocks) == 4
    assert any(e.startswith("backward") for e in events)
    assert max(seen) <= 2 and swap.max_resident <= 2, (max(seen), swap.max_resident, events)
    assert min(seen) >= 1
    # offloaded: an empty placeholder and no memory; the adapter's parameters never leave
    released = [b for b in swap.blocks if not b.resident]
    assert len(released) >= 3
    for b in released:
        frozen = [p for p in b.module.parameters() if not p.requires_grad]
        assert frozen and all(p.shape == (0,) for p in frozen)
        assert all(t.storage.nbytes() == 0 for t in b.tensors)
        assert all(p.numel() > 0 for p in b.module.parameters() if p.requires_grad)


def test_bad_counts_are_user_errors():
    model = _model("dit")
    assert block_count(model) == 5
    with pytest.raises(
        UserError, match=r"6 blocks to swap, but the model has 5 repeated blocks \(blocks\)"
    ) as caught:
        swap_blocks(model, 6, "cpu")
    assert caught.value.where == "$.train.blocks_to_swap"
    assert swap_blocks(model, 0, "cpu") is None

    bare = DiffusionModel(torch.nn.Linear(2, 2), latent_channels=2)
    with pytest.raises(UserError, match="declares no repeated blocks to swap"):
        swap_blocks(bare, 1, "cpu")

    model.backbone.requires_grad_(True)  # a full finetune: the swapped blocks' own weights train
    with pytest.raises(UserError, match="trains its own weights") as caught:
        swap_blocks(model, 2, "cpu")
    assert "offload_params" in str(caught.value)


def test_remove_brings_the_weights_back():
    model = _model("dit")
    params = _adapter(model, "lora")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    swap = swap_blocks(model, 2, "cpu", trainable=params, arm=True)
    assert swap.resident() == []
    x = _inputs("dit", 0)
    with torch.no_grad():
        swapped = model.backbone(*x)
    swap.remove()
    assert all(_materialised(b) for _, b in _blocks(model))
    with torch.no_grad():
        assert torch.equal(model.backbone(*x), swapped)
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())


def test_load_state_dict_refreshes_the_host_copies():
    model = _model("dit")
    model.backbone.requires_grad_(False)
    swap = swap_blocks(model, 2, "cpu", arm=True)
    state = {k: torch.full_like(v, 0.5) for k, v in model.backbone.state_dict().items()}
    model.backbone.load_state_dict(state)
    assert swap.resident() == []
    assert all(torch.equal(v, state[k]) for k, v in model.backbone.state_dict().items())


def _lora_job(out, swap, checkpoint_every=1):
    from tests.jobs import tiny_job

    train = {
        "steps": 2,
        "checkpoint_every": checkpoint_every,
        "gradient_checkpointing": True,
        "blocks_to_swap": swap,
    }
    spec = tiny_job(out, train=train)
    dit = {k: v for k, v in DIT.items() if k != "depth"}
    spec["model"] = {"type": "dit", **dit, "depth": 3, "prediction_type": "flow"}
    spec["scheduler"] = {"type": "flow"}
    spec["adapter"] = {"type": "lora", "rank": 2}
    return spec


def test_run_job_and_sample_with_swap_match_the_plain_ones(tmp_path, monkeypatch):
    """The whole loop (DeepSpeed, LoRA, checkpointing, a checkpoint saved mid-run) with
    train.blocks_to_swap gives the same losses and adapter as without; ``diffcore sample
    --blocks-to-swap`` draws the same image from it as without."""
    import argparse

    from PIL import Image
    from safetensors.torch import load_file

    from diffcore.commands.sample import add_sample_arguments, sample_command
    from diffcore.testing import run_job

    pytest.importorskip("deepspeed")

    job = _lora_job

    from diffcore.training import block_swap, loop

    installed = []

    def recorded(ctx, held):
        installed.append(block_swap.swap_for_training(ctx, held))
        return installed[-1]

    monkeypatch.setattr(loop, "swap_for_training", recorded)
    plain = run_job(job(tmp_path / "plain", 0), tmp_path / "plain")
    swapped = run_job(job(tmp_path / "swapped", 2), tmp_path / "swapped")
    assert installed[0] is None
    assert installed[1].armed and [b.name for b in installed[1].blocks] == ["blocks.1", "blocks.2"]
    assert plain.losses == swapped.losses
    a = load_file(str(plain.output_dir / "final" / "adapter.safetensors"))
    b = load_file(str(swapped.output_dir / "final" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def sample(out, *extra):
        parser = argparse.ArgumentParser()
        add_sample_arguments(parser)
        args = parser.parse_args(
            [
                "--from",
                str(swapped.output_dir),
                "--label",
                "1",
                "--steps",
                "3",
                "--device",
                "cpu",
                "--no-grid",
                "--out",
                str(out),
                *extra,
            ]  # fmt: skip
        )
        assert sample_command(args) == 0
        (png,) = out.glob("*.png")
        return torch.tensor(list(Image.open(png).getdata()))

    # bad counts stop the run before DeepSpeed starts, naming the key
    with pytest.raises(UserError, match=r"\$.train.blocks_to_swap: 4 blocks to swap, but the model has 3"):
        run_job(job(tmp_path / "four", 4), tmp_path / "four")
    zero3 = job(tmp_path / "zero3", 1)
    zero3["train"]["deepspeed"] = {"zero_stage": 3}
    with pytest.raises(UserError, match="ZeRO-3 partitions.*offload_params"):
        run_job(zero3, tmp_path / "zero3")

    assert torch.equal(sample(tmp_path / "s0"), sample(tmp_path / "s2", "--blocks-to-swap", "2"))
    with pytest.raises(UserError, match="4 blocks to swap, but the model has 3"):
        sample(tmp_path / "s4", "--blocks-to-swap", "4")
    with pytest.raises(UserError, match="--blocks-to-swap: must be at least 0, got -1"):
        sample(tmp_path / "s-1", "--blocks-to-swap", "-1")


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the side stream, events and pinned memory"
)
@pytest.mark.parametrize(
    ("arch", "adapter", "checkpointing"), [("dit", "lora", False), ("flux", "lora", True)]
)
def test_swap_is_exact_on_cuda(arch, adapter, checkpointing):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(
        SDPBackend.MATH
    ):  # deterministic attention backward, so the runs can be compared bit for bit
        plain = _train(arch, 0, adapter=adapter, checkpointing=checkpointing, device="cuda")
        swapped = _train(arch, 3, adapter=adapter, checkpointing=checkpointing, device="cuda")
    _assert_same(plain, swapped)
    swap = swapped["swap"]
    assert swap.max_resident <= 2
    assert all(t.host.is_pinned() for b in swap.blocks for t in b.tensors)


def test_swap_under_compiled_blocks_is_exact_and_adds_no_recompiles():
    """train.compile: blocks compiles each block's forward; the swap's hooks stay eager around it."""
    from diffcore.training.compile import compile_backbone

    def run(swap: int) -> tuple[list[torch.Tensor], Any, Any]:
        model = _model("dit")
        params = _adapter(model, "lora")
        model.set_gradient_checkpointing(True)
        swapper = swap_blocks(model, swap, "cpu", trainable=params)
        compiled = compile_backbone(model, "blocks", backend="aot_eager")
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for step in range(2):
            loss = model.backbone(*_inputs("dit", step)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        return [*losses, *(p.detach() for p in params)], compiled, swapper

    plain, plain_compiled, _ = run(0)
    swapped, compiled, swapper = run(3)
    assert all(torch.equal(a, b) for a, b in zip(plain, swapped))
    assert compiled.recompiles() == plain_compiled.recompiles()
    assert swapper.max_resident <= 2


class _Residual(torch.nn.Sequential):
    """A block that adds its input back itself, as every diffcore backbone's blocks do (a residual
    added outside the block would sum the input's gradients in another order: equal up to rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class _Reused(torch.nn.Module):
    """A backbone that runs one of its blocks twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            _Residual(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
            for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in (0, 1, 2, 1):
            x = self.blocks[i](x)
        return x


class _ReusedModel(DiffusionModel):
    adapter_targets = [r"blocks\.\d+\.[03]$"]

    def repeated_blocks(self) -> list[str]:
        return ["blocks"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_block_run_twice_per_forward_stays_exact(checkpointing):
    from diffcore.nn import checkpointed

    def run(swap: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        backbone = _Reused()
        model = _ReusedModel(backbone, latent_channels=8)
        params = _adapter(model, "lora")
        if checkpointing:
            for block in backbone.blocks:  # recomputed inside the block's own forward
                block.forward = lambda x, f=block.forward: checkpointed(f, x)
        swap_blocks(model, swap, "cpu", trainable=params)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        out = []
        for step in range(2):
            loss = backbone(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).square().mean()
            loss.backward()
            out += [loss.detach(), *(p.grad.clone() for p in params)]
            optimizer.step()
            optimizer.zero_grad()
        return out

    assert all(torch.equal(a, b) for a, b in zip(run(0), run(2)))


def test_held_blocks_stay_on_the_host_while_the_model_moves():
    """The loop holds the blocks to swap before model.to(device) (here the meta device stands in for
    the GPU): they and the adapter attached to them stay on the host until the swap takes them; a
    deep copy of a held block (a ControlNet trunk's) moves as usual."""
    import copy
    from types import SimpleNamespace

    from diffcore.config.job import TrainConfig
    from diffcore.training.block_swap import hold_on_host, swap_for_training

    model = _model("dit")
    job = SimpleNamespace(train=TrainConfig(blocks_to_swap=2))
    held = hold_on_host(job, model)
    copied = copy.deepcopy(model.backbone.blocks[4])
    model.backbone.to("meta")
    copied.to("meta")
    devices = {name: {p.device.type for p in block.parameters()} for name, block in _blocks(model)}
    assert devices == {"blocks.0": {"meta"}, "blocks.1": {"meta"}, "blocks.2": {"meta"}, "blocks.3": {"cpu"},
                       "blocks.4": {"cpu"}}  # fmt: skip
    assert {p.device.type for p in copied.parameters()} == {"meta"}
    with pytest.raises(UserError, match="7 blocks to swap, but the model has 5"):
        hold_on_host(SimpleNamespace(train=TrainConfig(blocks_to_swap=7)), model)

    model = _model("dit")
    held = hold_on_host(job, model)
    params = _adapter(model, "lora")
    ctx = SimpleNamespace(job=job, model=model, adapter_params=params, device=torch.device("cpu"))
    swap = swap_for_training(ctx, held)
    assert swap.armed and swap.resident() == [] and [b.name for b in swap.blocks] == ["blocks.3", "blocks.4"]
    model.backbone.to("meta")  # released: the blocks follow the model again (their placeholders)
    assert {p.device.type for p in model.backbone.blocks[4].parameters()} == {"meta"}


def test_a_cast_of_the_offloaded_weights_is_followed():
    """DeepSpeed casts every parameter (placeholders included) to bf16/fp16 after the swap is set up:
    the host copies follow, and the model computes as the cast model does."""
    model = _model("dit")
    model.backbone.requires_grad_(False)
    reference = _model("dit").backbone.to(torch.float64)
    swap_blocks(model, 3, "cpu", arm=True)
    for p in model.backbone.parameters():  # as DeepSpeed's _cast_module_mixed_precision does
        p.data = p.data.to(torch.float64)
    x, t, y = _inputs("dit", 0)
    with torch.no_grad():
        assert torch.equal(model.backbone(x.double(), t.double(), y), reference(x.double(), t.double(), y))
    assert all(
        v.dtype == torch.float64 for v in model.backbone.state_dict().values() if v.is_floating_point()
    )


@pytest.mark.slow
def test_two_processes_with_swap_match_the_plain_run(tmp_path):
    """Under torchrun each rank holds the swapped blocks on its host; a randomly initialised model
    differs per rank until rank 0's weights are broadcast, the swapped blocks' included."""
    from safetensors.torch import load_file

    from diffcore.testing import run_job

    pytest.importorskip("deepspeed")
    plain = run_job(_lora_job(tmp_path / "plain", 0, 0), tmp_path / "plain", processes=2)
    swapped = run_job(_lora_job(tmp_path / "swapped", 2, 0), tmp_path / "swapped", processes=2)
    assert plain.returncode == swapped.returncode == 0, swapped.stderr[-2000:]
    assert plain.losses == swapped.losses
    a = load_file(str(plain.output_dir / "final" / "adapter.safetensors"))
    b = load_file(str(swapped.output_dir / "final" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
