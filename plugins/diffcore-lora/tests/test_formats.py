"""Adapter files: kohya and PEFT layouts, metadata, loading back, merging, strength and stacking."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffcore_lora.adapter import NetworkAdapter
from diffcore_lora.config import DoraConfig, LohaConfig, LokrConfig, LoraConfig
from diffcore_lora.stack import apply_adapters
from lora_tiny import TinyModel, TinyNet, TinyTextEncoder, inputs, randomize
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import diffcore
from diffcore.errors import ConfigError, UserError

CONFIGS = {"lora": LoraConfig, "dora": DoraConfig, "lokr": LokrConfig, "loha": LohaConfig}


def _model(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    model = TinyModel(TinyNet(), frozen={"te1": TinyTextEncoder()}, latent_channels=4)
    model.architecture = "tiny"  # what the kernel sets to the registered name when it builds a model
    return model


def _trained(kind: str, seed: int = 0, **options) -> tuple[TinyModel, NetworkAdapter]:
    model = _model()
    options.setdefault("rank", 4)
    adapter = NetworkAdapter(CONFIGS[kind](**options), kind=kind)
    randomize(adapter.attach(model), seed=seed + 3)
    if kind == "dora":  # trained magnitudes stay near the row norms (a random one near 0 is no test)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for target in adapter.targets:
                branch = adapter.branches[target.ident]
                norm = branch.merged_weight(target.layer.weight)[1]
                branch.magnitude.copy_(norm * (0.8 + 0.4 * torch.rand(norm.shape, generator=g)))
    return model, adapter


def _out(model: TinyModel) -> torch.Tensor:
    x, img = inputs()
    with torch.no_grad():
        a, b = model.backbone(x, img)
    return torch.cat([a.flatten(), b.flatten()])


def test_kohya_keys_alpha_and_metadata(tmp_path):
    model, adapter = _trained("lora", alpha=2.0, text_encoders=["te1"])
    path = tmp_path / "a.safetensors"
    adapter.save(path, metadata={"diffcore.base_model": "tiny/base"})
    sd = load_file(path)
    down = sd["lora_unet_blocks_0_to_q.lora_down.weight"]
    assert down.shape == (4, 16)
    assert sd["lora_unet_blocks_0_to_q.lora_up.weight"].shape == (16, 4)
    assert sd["lora_unet_blocks_1_conv.lora_down.weight"].shape == (4, 8, 3, 3)
    assert sd["lora_unet_blocks_1_conv.lora_up.weight"].shape == (8, 4, 1, 1)
    assert sd["lora_te1_q_proj.lora_down.weight"].shape == (4, 16)
    modules = {k.split(".")[0] for k in sd}
    assert all(f"{m}.alpha" in sd for m in modules)
    assert float(sd["lora_unet_blocks_0_ff_0.alpha"]) == 2.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["diffcore.version"] == diffcore.__version__
    assert meta["diffcore.adapter"] == "lora"
    assert meta["diffcore.rank"] == "4" and meta["diffcore.alpha"] == "2.0"
    assert meta["diffcore.format"] == "kohya"
    assert meta["diffcore.architecture"] == "tiny"
    assert meta["diffcore.base_model"] == "tiny/base"


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_save_and_load_back(tmp_path, kind, fmt):
    model, adapter = _trained(kind, alpha=3.0, text_encoders=True)
    expected = _out(model)
    path = tmp_path / "a.safetensors"
    if fmt == "peft" and kind in ("lokr", "loha"):
        with pytest.raises(UserError, match="no PEFT/diffusers file format"):
            adapter.save(path, fmt=fmt)
        return
    adapter.save(path, fmt=fmt)
    fresh = _model()
    again = NetworkAdapter(CONFIGS[kind](rank=4, text_encoders=True), kind=kind)
    again.attach(fresh)
    assert not torch.allclose(_out(fresh), expected)
    again.load(path)
    torch.testing.assert_close(_out(fresh), expected)
    te_in = torch.randn(2, 16)
    torch.testing.assert_close(fresh.frozen["te1"](te_in), model.frozen["te1"](te_in))
    # and the file alone, without a config, rebuilds the same adapter for sampling
    sampled = _model()
    NetworkAdapter.from_file(sampled, path)
    torch.testing.assert_close(_out(sampled), expected)


def test_dora_scale_layout(tmp_path):
    _, adapter = _trained("dora")
    sd = adapter.state_dict("kohya")
    assert sd["lora_unet_blocks_0_to_q.dora_scale"].shape == (16, 1)
    assert sd["lora_unet_blocks_0_conv.dora_scale"].shape == (8, 1, 1, 1)
    peft_sd = adapter.state_dict("peft")
    prefix = next(iter(peft_sd)).split(".")[0]
    assert peft_sd[f"{prefix}.blocks.0.to_q.lora_magnitude_vector"].shape == (16,)
    assert peft_sd[f"{prefix}.blocks.0.conv.lora_magnitude_vector"].shape == (1, 8, 1, 1)


def test_peft_layout_and_metadata(tmp_path):
    model, adapter = _trained("lora", alpha=8.0)
    path = tmp_path / "p.safetensors"
    adapter.save(path, fmt="peft")
    sd = load_file(path)
    assert sd["transformer.blocks.0.to_q.lora_A.weight"].shape == (4, 16)
    assert sd["transformer.blocks.0.to_q.lora_B.weight"].shape == (16, 4)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8.0
    assert "blocks.0.to_q" in meta["transformer.target_modules"]


def test_peft_file_loads_into_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model, adapter = _trained("dora", alpha=8.0)
    expected = _out(model)
    path = tmp_path / "p.safetensors"
    adapter.save(path, fmt="peft")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    fields = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")}
    reference = peft.get_peft_model(copy.deepcopy(_model().backbone), peft.LoraConfig(**fields))
    state = {"base_model.model." + k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    result = peft.set_peft_model_state_dict(reference, state)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    x, img = inputs()
    with torch.no_grad():
        a, b = reference(x, img)
    torch.testing.assert_close(torch.cat([a.flatten(), b.flatten()]), expected, atol=1e-6, rtol=0)


def test_load_reports_mismatches(tmp_path):
    _, adapter = _trained("lora")
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    other = NetworkAdapter(LoraConfig(rank=8), kind="lora")
    other.attach(_model())
    with pytest.raises(UserError) as err:
        other.load(path)
    assert "set the adapter's rank (and factor)" in err.value.render()
    # a model of another width (another architecture or size): the hint names the width, not the rank
    torch.manual_seed(0)
    wide = TinyModel(TinyNet(dim=24), frozen={"te1": TinyTextEncoder()}, latent_channels=4)
    wide.architecture = "tiny"
    same_rank = NetworkAdapter(LoraConfig(rank=4), kind="lora")
    same_rank.attach(wide)
    with pytest.raises(UserError) as err:
        same_rank.load(path)
    assert "the layer's width differs" in err.value.render() and "rank" not in err.value.hint
    sd = load_file(path)
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 16)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    same = NetworkAdapter(LoraConfig(rank=4), kind="lora")
    same.attach(_model())
    with pytest.raises(UserError, match="name no adapted layer"):
        same.load(bad)
    lokr = NetworkAdapter(LokrConfig(rank=4), kind="lokr")
    lokr.attach(_model())
    with pytest.raises(UserError, match="holds a lora adapter"):
        lokr.load(path)


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_merge_then_unmerge_restores_the_base(kind, strength):
    model, adapter = _trained(kind)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "adapters" not in k}
    adapter.set_strength(strength)
    live = _out(model)
    adapter.merge()
    assert adapter.merged
    torch.testing.assert_close(_out(model), live, atol=1e-5, rtol=1e-5)
    changed = model.backbone.blocks[0].to_q.weight
    assert not torch.allclose(changed, before["blocks.0.to_q.weight"])
    adapter.unmerge()
    after = {k: v for k, v in model.backbone.state_dict().items() if "adapters" not in k}
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_out(model), live, atol=1e-5, rtol=1e-5)


def test_strength_scales_the_update():
    model, adapter = _trained("lora")
    layer, x = model.backbone.blocks[0].to_q, torch.randn(3, 16)
    full = layer(x)
    adapter.set_strength(0.0)
    base = layer(x)
    torch.testing.assert_close(base, torch.nn.functional.linear(x, layer.weight, layer.bias))
    adapter.set_strength(0.25)
    torch.testing.assert_close(layer(x), base + 0.25 * (full - base), atol=1e-5, rtol=1e-5)
    base = _out(model) * 0 + _out(_model())
    adapter.detach()
    torch.testing.assert_close(_out(model), base)
    assert type(model.backbone.blocks[0].to_q) is nn.Linear
    assert not any("adapters" in k for k in model.backbone.state_dict())


def test_stacked_files_add_with_their_strengths(tmp_path):
    paths = []
    for i, kind in enumerate(["lora", "lokr"]):
        _, adapter = _trained(kind, seed=10 * i)
        paths.append(tmp_path / f"{kind}.safetensors")
        adapter.save(paths[-1])

    def weights(m):
        return {k: v.clone() for k, v in m.backbone.state_dict().items() if "adapters" not in k}

    base = weights(_model())
    deltas = []
    for path in paths:  # each file's own weight delta, merged at strength 1
        single = _model()
        NetworkAdapter.from_file(single, path).merge()
        deltas.append({k: v - base[k] for k, v in weights(single).items()})
    model = _model()
    adapters = apply_adapters(model, [(paths[0], 0.5), (paths[1], 1.5)])
    assert [a.kind for a in adapters] == ["lora", "lokr"]
    assert adapters[0].name != adapters[1].name
    live = _out(model)
    merged = _model()
    NetworkAdapter.apply_adapters(merged, [(paths[0], 0.5), (paths[1], 1.5)], merge=True)
    for key, value in weights(merged).items():
        torch.testing.assert_close(
            value, base[key] + 0.5 * deltas[0][key] + 1.5 * deltas[1][key], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(_out(merged), live, atol=1e-4, rtol=1e-4)
    adapters[1].set_strength(0.0)
    only_first = _model()
    apply_adapters(only_first, [(paths[0], 0.5)])
    torch.testing.assert_close(_out(model), _out(only_first))


class FusedNet(nn.Module):
    """A fused qkv projection whose diffusers form is three layers (as Flux's img_attn.qkv)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.qkv(x)[..., :16])


class FusedModel(TinyModel):
    adapter_targets = [r"qkv$", r"proj$"]

    def adapter_key(self, module_path: str, fmt: str):
        if fmt == "kohya":
            return "lora_unet_" + module_path.replace(".", "_")
        if module_path == "qkv":
            return [("attn.to_q", 16), ("attn.to_k", 16), ("attn.to_v", 16)]
        return "attn.to_out.0"


def _fused(seed=0):
    torch.manual_seed(seed)
    return FusedModel(FusedNet(), latent_channels=4)


def test_fused_layer_splits_and_rejoins_in_peft_format(tmp_path):
    model = _fused()
    adapter = NetworkAdapter(LoraConfig(rank=2, alpha=4.0), kind="lora")
    randomize(adapter.attach(model))
    sd = adapter.state_dict("peft")
    assert sorted(sd) == sorted(
        f"transformer.attn.{m}.{ab}.weight"
        for m in ("to_q", "to_k", "to_v", "to_out.0")
        for ab in ("lora_A", "lora_B")
    )
    torch.testing.assert_close(
        sd["transformer.attn.to_k.lora_A.weight"], sd["transformer.attn.to_q.lora_A.weight"]
    )
    assert sd["transformer.attn.to_v.lora_B.weight"].shape == (16, 2)
    path = tmp_path / "f.safetensors"
    adapter.save(path, fmt="peft")
    x = torch.randn(3, 16)
    fresh = _fused()
    again = NetworkAdapter(LoraConfig(rank=2), kind="lora")
    again.attach(fresh)
    again.load(path)
    torch.testing.assert_close(fresh.backbone(x), model.backbone(x))


def test_fused_layer_from_separate_diffusers_loras(tmp_path):
    """A diffusers-trained file with its own lora_A per q/k/v loads block-diagonally, exactly."""
    g = torch.Generator().manual_seed(0)
    sd, delta = {}, []
    for name, scale in (("to_q", 1.0), ("to_k", 0.5), ("to_v", 2.0)):
        a, b = torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g)
        sd[f"transformer.attn.{name}.lora_A.weight"] = a
        sd[f"transformer.attn.{name}.lora_B.weight"] = b
        sd[f"transformer.attn.{name}.alpha"] = torch.tensor(2.0 * scale)
        delta.append(b @ a * scale)
    path = tmp_path / "d.safetensors"
    save_file(sd, path)
    model = _fused()
    base_w = model.backbone.qkv.weight.clone()
    adapter = NetworkAdapter.from_file(model, path)
    adapter.merge()
    torch.testing.assert_close(model.backbone.qkv.weight, base_w + torch.cat(delta), atol=1e-5, rtol=1e-5)


def test_registry_builds_adapters_and_checks_config():
    adapter = diffcore.build_component("adapter", "dora", {"rank": 2, "alpha": 1, "text_encoders": ["te1"]})
    assert isinstance(adapter, NetworkAdapter) and adapter.kind == "dora"
    assert adapter.config.text_encoders == ["te1"]
    with pytest.raises(ConfigError, match="rank"):
        diffcore.build_component("adapter", "lora", {"rank": 0})
    with pytest.raises(ConfigError, match="rnak"):
        diffcore.build_component("adapter", "lora", {"rnak": 4})
    assert callable(adapter.apply_adapters)


def test_clip_text_encoder_names_with_and_without_text_model(tmp_path):
    """transformers 5's CLIPTextModel has no ``text_model`` level; kohya keeps the published name and a
    PEFT file written either way loads."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1
    )
    torch.manual_seed(0)
    model = TinyModel(TinyNet(), frozen={"te1": CLIPTextModel(config)}, latent_channels=4)
    adapter = NetworkAdapter(LoraConfig(rank=2, text_encoders=True), kind="lora")
    randomize(adapter.attach(model))
    kohya = adapter.state_dict("kohya")
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    peft_sd = adapter.state_dict("peft")
    te_keys = [k for k in peft_sd if k.startswith("text_encoder.")]
    assert te_keys
    # the published spelling (what transformers 4 named these modules) reads as the same layers
    path = tmp_path / "te.safetensors"
    renamed = {}
    for k, v in peft_sd.items():
        if k.startswith("text_encoder.") and not k.startswith("text_encoder.text_model."):
            k = "text_encoder.text_model." + k.removeprefix("text_encoder.")
        renamed[k] = v.contiguous()
    save_file(renamed, path)
    torch.manual_seed(0)
    fresh = TinyModel(TinyNet(), frozen={"te1": CLIPTextModel(config)}, latent_channels=4)
    NetworkAdapter.from_file(fresh, path)
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.frozen["te1"](ids).last_hidden_state, model.frozen["te1"](ids).last_hidden_state
        )
