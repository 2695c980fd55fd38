"""LoKr and LoHa match LyCORIS: the same tensors give the same weight delta and the same outputs, and a
saved LoKr file rebuilds in LyCORIS with the same delta."""

from __future__ import annotations

import copy

import pytest
import torch
from diffcore_lora.adapter import NetworkAdapter
from diffcore_lora.branches import factorization
from diffcore_lora.config import LohaConfig, LokrConfig
from lora_tiny import TinyModel, randomize
from safetensors.torch import load_file
from torch import nn

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402


def test_factorization_matches_lycoris():
    from lycoris.functional.general import factorization as reference

    for dim in (1, 7, 16, 64, 127, 128, 250, 320, 360, 512, 1024, 1280, 3072):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dim, factor) == reference(dim, factor), (dim, factor)
    assert factorization(128) == (8, 16)
    assert factorization(128, 4) == (4, 32)


LAYERS = {
    "linear": lambda: nn.Linear(64, 96),
    "conv3x3": lambda: nn.Conv2d(16, 32, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(16, 32, 1),
}

LOKR_CASES = [
    # (layer, options): full w1 + factored w2; both factored; both full (scale 1); conv; conv tucker
    ("linear", dict(rank=4, alpha=2.0)),
    ("linear", dict(rank=2, alpha=3.0, decompose_both=True, factor=4)),
    ("linear", dict(rank=8, alpha=4.0, full_matrix=True)),
    ("conv3x3", dict(rank=4, alpha=2.0)),
    ("conv3x3", dict(rank=2, alpha=2.0, use_tucker=True)),
    ("conv1x1", dict(rank=4, alpha=1.0, factor=4)),
]


def _ours(layer_kind: str, kind: str, **options):
    torch.manual_seed(0)
    layer = LAYERS[layer_kind]()
    plain = copy.deepcopy(layer)
    model = TinyModel(nn.Sequential(layer), latent_channels=4)
    cfg = (LokrConfig if kind == "lokr" else LohaConfig)(targets=["^0$"], **options)
    adapter = NetworkAdapter(cfg, kind=kind)
    randomize(adapter.attach(model))
    return model, adapter, plain


def _reference(cls, plain: nn.Module, branch, **options):
    ref = cls(
        "ref",
        plain,
        multiplier=1.0,
        lora_dim=options.get("rank", 4),
        alpha=options.get("alpha", options.get("rank", 4)),
        **{k: v for k, v in options.items() if k not in ("rank", "alpha")},
    )
    with torch.no_grad():
        own = branch.kohya_tensors()
        for name, p in ref.named_parameters():
            assert name in own, f"LyCORIS has {name}, we do not ({sorted(own)})"
            p.copy_(own[name].reshape(p.shape))
        assert set(own) == {n for n, _ in ref.named_parameters()}
    ref.apply_to()
    return ref


def _input(layer_kind):
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(2, 3, 64, generator=g)
        if layer_kind == "linear"
        else torch.randn(2, 16, 6, 6, generator=g)
    )


@pytest.mark.parametrize(
    "layer_kind,options", LOKR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(LOKR_CASES)]
)
def test_lokr_matches_lycoris(layer_kind, options):
    model, adapter, plain = _ours(layer_kind, "lokr", **options)
    branch = model.backbone[0].adapters[adapter.name]
    ref = _reference(LokrModule, plain, branch, **options)
    assert branch.scale == pytest.approx(ref.scale)
    torch.testing.assert_close(
        branch.delta_weight(plain.weight), ref.get_weight(ref.shape), atol=1e-6, rtol=0
    )
    x = _input(layer_kind)
    torch.testing.assert_close(model.backbone(x), plain(x), atol=1e-5, rtol=1e-6)


LOHA_CASES = [
    ("linear", dict(rank=4, alpha=2.0)),
    ("conv3x3", dict(rank=3, alpha=1.5)),
    ("conv1x1", dict(rank=2)),
]


@pytest.mark.parametrize("layer_kind,options", LOHA_CASES, ids=[c[0] for c in LOHA_CASES])
def test_loha_matches_lycoris(layer_kind, options):
    model, adapter, plain = _ours(layer_kind, "loha", **options)
    branch = model.backbone[0].adapters[adapter.name]
    ref = _reference(LohaModule, plain, branch, **options)
    torch.testing.assert_close(
        branch.delta_weight(plain.weight), ref.get_weight(ref.shape), atol=1e-6, rtol=0
    )
    x = _input(layer_kind)
    torch.testing.assert_close(model.backbone(x), plain(x), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(
    "layer_kind,options", LOKR_CASES[:4], ids=[f"{c[0]}-{i}" for i, c in enumerate(LOKR_CASES[:4])]
)
def test_saved_lokr_file_rebuilds_in_lycoris(tmp_path, layer_kind, options):
    model, adapter, plain = _ours(layer_kind, "lokr", **options)
    branch = model.backbone[0].adapters[adapter.name]
    path = tmp_path / "lokr.safetensors"
    adapter.save(path)
    sd = load_file(path)
    key = "lora_unet_0"
    assert f"{key}.alpha" in sd
    get = lambda n: sd.get(f"{key}.{n}")  # noqa: E731
    with torch.no_grad():  # LyCORIS copies into its parameters in place
        ref = LokrModule.make_module_from_state_dict(
            key,
            copy.deepcopy(plain),
            get("lokr_w1"),
            get("lokr_w1_a"),
            get("lokr_w1_b"),
            get("lokr_w2"),
            get("lokr_w2_a"),
            get("lokr_w2_b"),
            None,
            get("lokr_t2"),
            get("alpha"),
            None,
        )
    torch.testing.assert_close(
        ref.get_weight(ref.shape), branch.delta_weight(plain.weight), atol=1e-6, rtol=0
    )


def test_lokr_zero_init_leaves_the_model_unchanged():
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    plain = copy.deepcopy(layer)
    model = TinyModel(nn.Sequential(layer), latent_channels=4)
    NetworkAdapter(LokrConfig(targets=["0"], rank=4), kind="lokr").attach(model)
    x = torch.randn(2, 64)
    torch.testing.assert_close(model.backbone(x), plain(x))
