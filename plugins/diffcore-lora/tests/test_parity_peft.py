"""LoRA and DoRA match PEFT on the same tensors: outputs and gradients within 1e-6."""

from __future__ import annotations

import copy

import pytest
import torch
from diffcore_lora.adapter import NetworkAdapter
from diffcore_lora.config import DoraConfig, LoraConfig
from lora_tiny import TinyModel, TinyNet, inputs
from torch import nn

peft = pytest.importorskip("peft")


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(8, 12, 3, padding=1, stride=2)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def _setup(use_dora: bool, dtype=torch.float32):
    torch.manual_seed(0)
    base = Pair().to(dtype)
    ours_model = TinyModel(copy.deepcopy(base), latent_channels=4)
    cfg = (DoraConfig if use_dora else LoraConfig)(rank=4, alpha=8.0, targets=["lin$", "conv$"])
    adapter = NetworkAdapter(cfg, kind="dora" if use_dora else "lora")
    adapter.attach(ours_model)
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"], use_dora=use_dora),
    )
    g = torch.Generator().manual_seed(5)
    ours_layers = {"lin": ours_model.backbone.lin, "conv": ours_model.backbone.conv}
    with torch.no_grad():
        for name, layer in ours_layers.items():
            branch = layer.adapters[adapter.name]
            ref = getattr(reference.base_model.model, name)
            down = torch.randn(branch.lora_down.shape, generator=g).to(dtype) * 0.3
            up = torch.randn(branch.lora_up.shape, generator=g).to(dtype) * 0.3
            branch.lora_down.copy_(down)
            branch.lora_up.copy_(up)
            ref.lora_A["default"].weight.copy_(down)
            ref.lora_B["default"].weight.copy_(up)
            if use_dora:
                mag = torch.rand(branch.magnitude.shape, generator=g).to(dtype) + 0.5
                branch.magnitude.copy_(mag)
                ref.lora_magnitude_vector["default"].weight.copy_(
                    mag.view_as(ref.lora_magnitude_vector["default"].weight)
                )
    return ours_model.backbone, reference, adapter


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_outputs_and_gradients_match_peft(use_dora):
    ours, reference, adapter = _setup(use_dora)
    x, _ = inputs()
    img = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(9))
    xo, io = x.clone().requires_grad_(True), img.clone().requires_grad_(True)
    xr, ir = x.clone().requires_grad_(True), img.clone().requires_grad_(True)
    lo, co = ours(xo, io)
    lr, cr = reference(xr, ir)
    torch.testing.assert_close(lo, lr, atol=1e-6, rtol=0)
    torch.testing.assert_close(co, cr, atol=1e-6, rtol=0)
    w = torch.randn_like(lo)
    v = torch.randn_like(co)
    ((lo * w).sum() + (co * v).sum()).backward()
    ((lr * w).sum() + (cr * v).sum()).backward()
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(io.grad, ir.grad, atol=1e-6, rtol=0)
    ref_layers = reference.base_model.model
    for name in ("lin", "conv"):
        branch = getattr(ours, name).adapters[adapter.name]
        ref = getattr(ref_layers, name)
        torch.testing.assert_close(
            branch.lora_down.grad, ref.lora_A["default"].weight.grad, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(branch.lora_up.grad, ref.lora_B["default"].weight.grad, atol=1e-6, rtol=0)
        if use_dora:
            ref_mag = ref.lora_magnitude_vector["default"].weight.grad
            torch.testing.assert_close(
                branch.magnitude.grad, ref_mag.view_as(branch.magnitude), atol=1e-6, rtol=0
            )
        # the base weights are frozen and get no gradient
        assert getattr(ours, name).weight.grad is None


def test_default_init_is_peft_like():
    """Kaiming-uniform down (bound 1/sqrt(fan_in), as PEFT) and zero up: a fresh adapter changes nothing."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24))
    model = TinyModel(copy.deepcopy(base), latent_channels=4)
    adapter = NetworkAdapter(LoraConfig(rank=4, targets=["0"]), kind="lora")
    adapter.attach(model)
    branch = model.backbone[0].adapters[adapter.name]
    assert branch.lora_down.abs().max() <= 1 / 16**0.5
    assert branch.lora_down.std() > 0.05
    assert torch.count_nonzero(branch.lora_up) == 0
    x = torch.randn(3, 16)
    torch.testing.assert_close(model.backbone(x), base(x))


def test_attach_returns_only_adapter_parameters(tiny_model):
    adapter = NetworkAdapter(LoraConfig(rank=2), kind="lora")
    params = adapter.attach(tiny_model)
    trainable = [p for p in tiny_model.backbone.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable}
    # to_q, to_k, ff.0, ff.2, conv in each of 2 blocks, 2 tensors each (proj is not a target)
    assert len(params) == 2 * 5 * 2
    assert isinstance(tiny_model.backbone.blocks[0].to_q, nn.Linear)
    assert "blocks.0.to_q.adapters.lora.lora_down" in tiny_model.backbone.state_dict()
    assert not hasattr(tiny_model.backbone.blocks[0].proj, "adapters")


def test_text_encoders_on_request(tiny_model):
    adapter = NetworkAdapter(LoraConfig(rank=2, text_encoders=True), kind="lora")
    params = adapter.attach(tiny_model)
    te = tiny_model.frozen["te1"]
    assert te.q_proj.adapters["lora"].lora_down.requires_grad
    assert len(params) == 2 * 5 * 2 + 2 * 2
    assert not te.q_proj.weight.requires_grad


def test_no_matching_targets_is_a_user_error(tiny_model):
    from diffcore.errors import UserError

    adapter = NetworkAdapter(LoraConfig(targets=["nothing_like_this"]), kind="lora")
    with pytest.raises(UserError, match="match no Linear or Conv2d layer"):
        adapter.attach(tiny_model)


def test_dropouts_only_in_training(tiny_model):
    adapter = NetworkAdapter(
        LoraConfig(rank=2, dropout=0.5, rank_dropout=0.5, module_dropout=0.5), kind="lora"
    )
    from lora_tiny import randomize

    randomize(adapter.attach(tiny_model))
    x, img = inputs()
    tiny_model.backbone.eval()
    a = tiny_model.backbone(x, img)[0]
    b = tiny_model.backbone(x, img)[0]
    torch.testing.assert_close(a, b)
    tiny_model.backbone.train()
    torch.manual_seed(0)
    c = tiny_model.backbone(x, img)[0]
    assert not torch.allclose(a, c)
    assert isinstance(TinyNet, type)
