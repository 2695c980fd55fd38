"""train.compile: compiled training follows the eager loss curve; adapted blocks compile without
graph breaks; a block that cannot compile runs eagerly after one warning; names and hooks stay as
they were; the combinations compile cannot serve are one-line errors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import diffcore
from diffcore.config.job import structure_job
from diffcore.errors import UserError
from diffcore.training import run_job
from diffcore.training.compile import CompileWarning, check_compile, compile_backbone
from tests.jobs import tiny_job

pytest.importorskip("diffcore_dit")

DIT = dict(hidden_size=16, depth=3, num_heads=2, patch_size=4, in_channels=3, input_size=8, num_classes=4)


def _model() -> diffcore.model.DiffusionModel:
    torch.manual_seed(0)
    model = diffcore.load_model("dit", **DIT)
    with torch.no_grad():  # larger than the zero-initialised gates so every block moves the output
        for p in model.backbone.parameters():
            p.normal_(0.0, 0.2)
    return model


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3.0, 700.0]), torch.tensor([1, 3])


def _attach(model, kind: str, **extra) -> list[torch.nn.Parameter]:
    from diffcore.api import build_component, component_config

    options = {"rank": 2, **extra} if kind != "lokr" else {"rank": 2, "factor": 2, **extra}
    params = list(build_component("adapter", kind, component_config("adapter", kind, options)).attach(model))
    with torch.no_grad():  # LoRA's up starts at zero: give every branch a gradient
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    return params


@pytest.mark.slow
def test_compiled_training_follows_the_eager_loss_curve(tmp_path):
    def losses(compile_mode):
        job = tiny_job(tmp_path / str(compile_mode), train={"steps": 20, "log_every": 1, "checkpoint_every": 0,
                                                           "compile": compile_mode})  # fmt: skip
        job["model"] = {"type": "dit", **DIT, "prediction_type": "flow"}
        job["scheduler"] = {"type": "flow"}
        run_job(structure_job(job))
        rows = [
            json.loads(line)
            for line in (tmp_path / str(compile_mode) / "metrics.jsonl").read_text().splitlines()
        ]
        return [r["loss"] for r in rows], rows

    eager, _ = losses(False)
    torch._dynamo.reset()
    compiled, rows = losses("blocks")
    assert len(eager) == len(compiled) == 20
    for step, (a, b) in enumerate(zip(eager, compiled), 1):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {step}: eager {a}, compiled {b}"
    # one graph for the three blocks (the first block's input needs no separate compile: it requires grad too)
    assert rows[-1]["recompiles"] == 0


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr"])
def test_an_adapted_block_compiles_without_graph_breaks(kind):
    model = _model()
    plain = copy.deepcopy(model.backbone.blocks[1])
    # every dropout on: module dropout draws a tensor, not a host-side branch per layer
    _attach(model, kind, dropout=0.1, rank_dropout=0.1, module_dropout=0.2)
    block = model.backbone.blocks[1].train()
    x, c = torch.randn(2, 4, 16, requires_grad=True), torch.randn(2, 16)
    explained = torch._dynamo.explain(block.forward)(x, c)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # a dropped module leaves the layer's own output
    from diffcore_lora.branches import Branch

    for branch in (m for m in block.modules() if isinstance(m, Branch)):
        branch.module_dropout = 1.0
    torch.testing.assert_close(block(x, c), plain(x, c))


def test_compiled_blocks_match_eager_with_checkpointing_and_keep_names_and_hooks():
    model = _model()
    _attach(model, "lora")
    eager_model = copy.deepcopy(model)
    names = list(model.backbone.state_dict())
    model.set_gradient_checkpointing(True)
    torch._dynamo.reset()
    compiled = compile_backbone(model, "blocks", backend="aot_eager")
    seen = []
    model.backbone.blocks[2].register_forward_pre_hook(
        lambda module, args: seen.append(torch.compiler.is_compiling())
    )

    out = model.backbone(*_inputs())
    ref = eager_model.backbone(*_inputs())
    torch.testing.assert_close(out, ref)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(model.backbone.named_parameters(), eager_model.backbone.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert list(model.backbone.state_dict()) == names  # no _orig_mod. prefixes
    # the three blocks share their class's compiled forward, without graph breaks
    stats = compiled.stats()
    assert stats["classes"] == 1 and stats["compiled"] == 3
    assert stats["graph_breaks"] == 0 and stats["eager"] == {}
    # the hook ran outside the compiled forward, in the forward and again in the recomputation
    assert seen == [False, False]
    # a copy's blocks run their own weights through the shared compiled forward
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.backbone.blocks.parameters():
            p.zero_()
    assert twin.backbone.blocks[0].forward.__self__ is twin.backbone.blocks[0]
    assert not torch.equal(twin.backbone(*_inputs()), model.backbone(*_inputs()))


def test_a_block_that_cannot_compile_runs_eagerly_after_one_warning():
    model = _model()
    reference = model.backbone(*_inputs())

    def refuses(graph, example_inputs):
        raise RuntimeError("this backend cannot lower the graph")

    torch._dynamo.reset()
    compiled = compile_backbone(model, "blocks", backend=refuses)
    with pytest.warns(
        CompileWarning, match=r"blocks\.0 \(DiTBlock\) could not compile and runs eagerly: .*cannot lower"
    ):
        out = model.backbone(*_inputs())
    torch.testing.assert_close(out, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning: later calls run eagerly without trying again
        torch.testing.assert_close(model.backbone(*_inputs()), reference)
    assert list(compiled.stats()["eager"]) == ["blocks.0 (DiTBlock)"]


def test_an_error_of_the_callers_own_is_not_a_compile_failure():
    model = _model()
    torch._dynamo.reset()
    compiled = compile_backbone(model, "blocks", backend="eager")
    x, t, y = _inputs()
    with pytest.raises(RuntimeError, match="shape|size"):
        model.backbone.blocks[0](torch.randn(2, 4, 7), torch.randn(2, 16))
    assert compiled.stats()["eager"] == {}
    torch.testing.assert_close(model.backbone(x, t, y), model.backbone(x, t, y))


def test_full_compiles_the_backbone_forward():
    model = _model()
    reference = model.backbone(*_inputs())
    names = list(model.backbone.state_dict())
    torch._dynamo.reset()
    compiled = compile_backbone(model, "full", backend="eager")
    torch.testing.assert_close(model.backbone(*_inputs()), reference)
    assert compiled.stats()["compiled"] == 1 and compiled.graphs() == 1
    assert list(model.backbone.state_dict()) == names
    with pytest.raises(UserError, match="already has its own forward"):
        compile_backbone(model, "full", backend="eager")


def test_combinations_compile_cannot_serve_are_user_errors():
    with pytest.raises(UserError, match="zero_stage 3") as exc:
        check_compile("blocks", zero_stage=3, blocks_to_swap=0)
    assert exc.value.where == "$.train.compile"
    with pytest.raises(UserError, match="block swap"):
        check_compile("full", zero_stage=0, blocks_to_swap=2)
    check_compile("blocks", zero_stage=2, blocks_to_swap=2)
    check_compile(False, zero_stage=3, blocks_to_swap=2)


def test_sample_compile_gives_the_eager_images(tmp_path, monkeypatch):
    import argparse

    import diffcore.training.compile as compile_module
    from diffcore.commands.sample import add_sample_arguments, sample_command

    calls = []
    real = compile_module.compile_backbone

    def eager_backend(model, mode, **options):  # the wiring, without code generation
        calls.append(mode)
        return real(model, mode, backend="eager")

    monkeypatch.setattr(compile_module, "compile_backbone", eager_backend)
    from diffcore_dit.network import DiT

    def random_weights(self):  # not the zero-initialised output: the images depend on every block
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    monkeypatch.setattr(DiT, "initialize_weights", random_weights)
    parser = argparse.ArgumentParser()
    add_sample_arguments(parser)
    images = {}
    for name, extra in (("eager", []), ("blocks", ["--compile", "blocks"])):
        torch._dynamo.reset()
        options = [f"--model-option={k}={v}" for k, v in DIT.items()]
        args = parser.parse_args(["--model", "dit", *options, "--label", "1", "--steps", "2", "--height", "8",
                                  "--out", str(tmp_path / name), "--no-grid", "--seed", "3", *extra])  # fmt: skip
        torch.manual_seed(0)
        assert sample_command(args) == 0
        images[name] = sorted((tmp_path / name).glob("*.png"))[0].read_bytes()
    assert calls == ["blocks"]
    assert images["eager"] == images["blocks"]


def test_compiled_blocks_under_block_swap_train_as_eager():
    from diffcore.training.block_swap import swap_blocks

    def losses_and_grads(compiled: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = _model()
        params = _attach(model, "lora")
        model.set_gradient_checkpointing(True)
        swap_blocks(model, 2, "cpu", trainable=params)  # the hooks first, as the loop does
        if compiled:
            torch._dynamo.reset()
            stats = compile_backbone(model, "blocks", backend="aot_eager")
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(2):
            loss = model.backbone(*_inputs()).square().mean()
            loss.backward()
            losses.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad()
        if compiled:
            assert stats.stats()["graph_breaks"] == 0 and stats.stats()["eager"] == {}
        return losses, [p.detach().clone() for p in params]

    eager, compiled = losses_and_grads(False), losses_and_grads(True)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
