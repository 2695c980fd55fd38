"""The adapters inside the kernel's DeepSpeed training loop: ZeRO stages 0-2, exact resume, and the
exported adapter.safetensors loading back for sampling."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("diffcore_example")  # the tiny model of contrib/diffcore-example

from diffcore.testing import run_job  # noqa: E402


def _job(adapter: dict, **train) -> dict:
    return {
        "name": "lora-tiny",
        "seed": 7,
        "model": {"type": "example-tiny", "width": 16, "num_classes": 4},
        "adapter": adapter,
        "scheduler": {"type": "ddpm", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        "method": {"type": "diffusion", "condition_dropout": 0.2},
        "data": {"type": "synthetic", "resolution": 8, "size": 32},
        "train": {"steps": 4, "batch_size": 4, "lr": 0.01, "checkpoint_every": 2, "keep_last": 3, **train},
        "callbacks": [{"type": "progress", "enabled": False}],
    }


ZERO = [
    pytest.param(0, {"type": "lora", "rank": 2, "rank_dropout": 0.1, "dropout": 0.1}, id="zero0-lora"),
    pytest.param(1, {"type": "dora", "rank": 2}, id="zero1-dora", marks=pytest.mark.slow),
    pytest.param(2, {"type": "lokr", "rank": 2, "module_dropout": 0.2}, id="zero2-lokr"),
    pytest.param(3, {"type": "lora", "rank": 2}, id="zero3-lora", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("stage,adapter", ZERO)
def test_trains_under_deepspeed_and_resumes_exactly(tmp_path, stage, adapter):
    ds = {"deepspeed": {"zero_stage": stage}}
    straight = tmp_path / "straight"
    losses = run_job(_job(adapter, **ds), straight).losses
    split = tmp_path / "split"
    run_job(_job(adapter, steps=2, **ds), split)
    again = run_job(_job(adapter, steps=4, **ds), split, resume=True).losses
    a = load_file(straight / "final" / "adapter.safetensors")
    b = load_file(split / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".alpha") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(losses) == 4 and losses == again
    # the adapter trained (its up/w2 factors left zero) and the file says what it is
    first = load_file(split / "checkpoints" / "step-2" / "adapter.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a if not k.endswith(".alpha"))
    with safe_open(str(straight / "final" / "adapter.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["diffcore.adapter"] == adapter["type"] and meta["diffcore.format"] == "kohya"


def test_exported_adapter_samples_through_from_file(tmp_path):
    from diffcore_lora.adapter import NetworkAdapter

    import diffcore

    out = tmp_path / "run"
    run_job(_job({"type": "lora", "rank": 2}, steps=2), out)
    torch.manual_seed(0)
    model = diffcore.load_model("example-tiny", width=16, num_classes=4)
    torch.manual_seed(0)
    reference = diffcore.load_model("example-tiny", width=16, num_classes=4)
    adapter = NetworkAdapter.from_file(model, out / "final" / "adapter.safetensors")
    assert adapter.kind == "lora" and {t.path for t in adapter.targets} == {
        "time_mlp.0",
        "time_mlp.2",
        "body.2",
    }
    x, t, y = torch.randn(2, model.latent_channels, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.allclose(model.predict(x, t, y), reference.predict(x, t, y))
        adapter.set_strength(0.0)
        torch.testing.assert_close(model.predict(x, t, y), reference.predict(x, t, y))
