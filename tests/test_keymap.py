"""The key-map rule table: every operation both ways, index arithmetic, and unclaimed keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffcore.errors import UserError
from diffcore.keymap import (
    Drop,
    Fuse,
    KeyMap,
    Rule,
    Split,
    Squeeze,
    SwapHalves,
    Tie,
    Transpose,
    Unsqueeze,
)
from diffcore.weights import Checkpoint

# a toy SDXL-like UNet naming: 2 layers per level, so input block n = 1 + level * 3 + layer
UNET = (
    Rule("down_blocks.{b}.resnets.{j}.norm1", "input_blocks.{1 + b * per + j}.0.in_layers.0"),
    Rule("down_blocks.{b}.resnets.{j}", "input_blocks.{1 + b * per + j}.0"),
    Rule("down_blocks.{b}.downsamplers.0.conv", "input_blocks.{b * per + per}.0.op"),
    Rule("up_blocks.{b}.upsamplers.0", "output_blocks.{b * per + per - 1}.{1 + attention[b]}"),
    Rule("conv_in", "input_blocks.0.0"),
)


def _state(keys: list[str]) -> dict[str, torch.Tensor]:
    return {k: torch.full((2, 3), float(i)) for i, k in enumerate(keys)}


def test_rename_with_index_arithmetic_both_ways():
    keymap = KeyMap(UNET, {"per": 3, "attention": (1, 0)}, name="original")
    assert keymap.file_name("down_blocks.1.resnets.1.conv1.weight") == "input_blocks.5.0.conv1.weight"
    assert keymap.file_name("down_blocks.1.resnets.0.norm1.bias") == "input_blocks.4.0.in_layers.0.bias"
    assert keymap.file_name("down_blocks.0.downsamplers.0.conv.weight") == "input_blocks.3.0.op.weight"
    assert keymap.file_name("up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.2.2.conv.weight"
    assert keymap.file_name("up_blocks.1.upsamplers.0") == "output_blocks.5.1"  # a module path
    assert keymap.file_name("down_blocks.0") is None  # a whole level has no single counterpart

    module = _state(
        ["conv_in.weight", "down_blocks.0.resnets.1.norm1.weight", "down_blocks.1.resnets.0.conv2.bias"]
    )
    saved = dict(keymap.save(module))
    assert set(saved) == {"input_blocks.0.0.weight", "input_blocks.2.0.in_layers.0.weight", "input_blocks.4.0.conv2.bias"}
    loaded = dict(keymap.load(saved, module, where="f"))
    assert loaded.keys() == module.keys()
    assert all(torch.equal(loaded[k], module[k]) for k in module)


def test_split_streams_and_fuses_back_in_any_order():
    rules = (
        Rule("blocks.{i}.qkv", tuple(f"blocks.{{i}}.to_{x}" for x in "qkv"), Split()),
        Rule("single.{i}.linear1", ("s.{i}.q", "s.{i}.k", "s.{i}.v", "s.{i}.mlp"), Split(("dim", "dim", "dim", None))),
    )
    keymap = KeyMap(rules, {"dim": 2})
    qkv = torch.arange(12.0).reshape(6, 2)
    linear1 = torch.arange(26.0).reshape(13, 2)
    saved = dict(keymap.save({"blocks.0.qkv.weight": qkv, "single.3.linear1.weight": linear1}))
    assert torch.equal(saved["blocks.0.to_k.weight"], qkv[2:4])
    assert saved["s.3.mlp.weight"].shape == (7, 2) and torch.equal(saved["s.3.v.weight"], linear1[4:6])
    assert keymap.rows("single.3.linear1") == (2, 2, 2, None)
    assert keymap.rows("blocks.0.qkv") is None
    module_keys = ["blocks.0.qkv.weight", "single.3.linear1.weight"]
    stream = keymap.load(reversed(list(saved.items())), module_keys, where="f")
    loaded = dict(stream)
    assert torch.equal(loaded["blocks.0.qkv.weight"], qkv) and torch.equal(loaded["single.3.linear1.weight"], linear1)
    # a fused tensor with a part missing is not yielded at all (the loader then reports it missing)
    partial = {k: v for k, v in saved.items() if k != "blocks.0.to_v.weight"}
    assert "blocks.0.qkv.weight" not in dict(keymap.load(partial, module_keys, where="f"))


def test_fuse_for_saving_is_the_inverse_of_split():
    rules = (
        Rule(
            tuple(f"layers.{{n}}.{x}_proj.weight" for x in "qkv"),
            "resblocks.{n}.attn.in_proj_weight",
            Fuse(),
        ),
        Rule("projection.weight", "text_projection", Transpose()),
    )
    keymap = KeyMap(rules)
    module = {f"layers.1.{x}_proj.weight": torch.randn(3, 3) for x in "qkv"}
    module["projection.weight"] = torch.randn(4, 3)
    saved = dict(keymap.save(module))
    assert set(saved) == {"resblocks.1.attn.in_proj_weight", "text_projection"}
    assert torch.equal(saved["resblocks.1.attn.in_proj_weight"][3:6], module["layers.1.k_proj.weight"])
    assert saved["text_projection"].shape == (3, 4)
    loaded = dict(keymap.load(saved, module, where="f"))
    assert all(torch.equal(loaded[k], module[k]) for k in module)
    with pytest.raises(UserError, match="fused siblings are missing.*layers.1.q_proj.weight"):
        dict(keymap.save({"layers.1.q_proj.weight": torch.zeros(1)}))


def test_swap_squeeze_unsqueeze():
    rules = (
        Rule("final.adaLN", "norm_out.linear", SwapHalves()),
        Rule("attn.to_q", "attn.q", Squeeze()),
        Rule("legacy.to_k", "legacy.to_k", Squeeze(save=False)),
        Rule("conv", "linear", Unsqueeze()),
    )
    keymap = KeyMap(rules)
    shift_scale = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])
    module = {
        "final.adaLN.weight": shift_scale,
        "attn.to_q.weight": torch.randn(4, 4),
        "attn.to_q.bias": torch.randn(4),
        "legacy.to_k.weight": torch.randn(4, 4),
        "conv.weight": torch.randn(4, 4, 1, 1),
    }
    saved = dict(keymap.save(module))
    assert torch.equal(saved["norm_out.linear.weight"][:2], torch.ones(2, 3))
    assert saved["attn.q.weight"].shape == (4, 4, 1, 1) and saved["attn.q.bias"].shape == (4,)
    assert saved["legacy.to_k.weight"].shape == (4, 4)
    assert saved["linear.weight"].shape == (4, 4)
    loaded = dict(keymap.load(saved, module, where="f"))
    assert all(torch.equal(loaded[k], module[k]) for k in module)
    # an older export with a 1x1 conv is read into the linear as well
    old = dict(keymap.load({"legacy.to_k.weight": torch.ones(4, 4, 1, 1)}, module, where="f"))
    assert old["legacy.to_k.weight"].shape == (4, 4)


def test_tie_writes_a_copy_per_block_and_refuses_copies_that_differ():
    rules = (
        Rule("t_embedder", "blocks.{i}.emb.t", Tie("i", "depth", message="block {index}'s embedder differs")),
        Rule("blocks.{i}.fc", "blocks.{i}.ff"),
    )
    keymap = KeyMap(rules, {"depth": 3})
    module = {"t_embedder.weight": torch.randn(2, 2), "blocks.0.fc.weight": torch.randn(2, 2)}
    saved = dict(keymap.save(module))
    assert [k for k in saved if ".emb." in k] == [f"blocks.{i}.emb.t.weight" for i in range(3)]
    assert saved["blocks.2.emb.t.weight"].data_ptr() != saved["blocks.0.emb.t.weight"].data_ptr()
    loaded = list(keymap.load(saved, module, where="f"))
    assert [k for k, _ in loaded].count("t_embedder.weight") == 1
    saved["blocks.2.emb.t.weight"] = saved["blocks.2.emb.t.weight"] + 1
    with pytest.raises(UserError, match="block 2's embedder differs"):
        list(keymap.load(saved, module, where="f"))


def test_unclaimed_keys_are_reported_and_drops_are_read_past(tmp_path):
    keymap = KeyMap((Drop("loss.*"), Drop("pos_embed"), Rule("fc", "mlp.fc")), name="original")
    file = tmp_path / "w.safetensors"
    tensors = {"mlp.fc.weight": torch.ones(2), "loss.disc.weight": torch.ones(1), "pos_embed": torch.ones(1)}
    save_file(tensors, str(file))
    checkpoint = Checkpoint(file)
    loaded = dict(keymap.load(checkpoint.items(), ["fc.weight"], where=str(file)))
    assert list(loaded) == ["fc.weight"]
    save_file({**tensors, "extra.a": torch.ones(1), "extra.b": torch.ones(1)}, str(file))
    with pytest.raises(UserError, match=r"2 file key\(s\) that no rule of the original layout claims \(e.g. extra.a, extra.b\)") as info:
        dict(keymap.load(Checkpoint(file).items(), ["fc.weight"], where=str(file)))
    assert info.value.where == str(file)
    with pytest.raises(UserError, match="1 module key.*unknown.weight"):
        dict(keymap.save({"fc.weight": torch.ones(1), "unknown.weight": torch.ones(1)}))


def test_star_captures_and_first_rule_wins():
    keymap = KeyMap((Rule("*.query_norm.weight", "*.query_norm.scale"), Rule("*", "*")))
    assert keymap.file_name("double_blocks.0.img_attn.norm.query_norm.weight") == (
        "double_blocks.0.img_attn.norm.query_norm.scale"
    )
    assert keymap.file_name("img_in.weight") == "img_in.weight"
    assert keymap.with_params(dim=3).params == {"dim": 3}
    rules = (Rule("a", "b"),)
    shared = KeyMap.of(rules, {"dim": 3}, name="x")
    assert KeyMap.of(rules, {"dim": 3}, name="x") is shared and KeyMap.of(rules, {"dim": 4}) is not shared


def test_bad_rules_are_refused_when_written():
    with pytest.raises(ValueError, match="Split maps one module pattern"):
        Rule(("a", "b"), "c", Split())
    with pytest.raises(ValueError, match="many-to-one rule needs Split or Fuse"):
        Rule("a", ("b", "c"))
    with pytest.raises(ValueError, match="2 sizes for 3 parts"):
        Rule("a", ("b", "c", "d"), Split((1, 2)))
    keymap = KeyMap((Rule("a.{i}", "b.{i + missing}"),))
    with pytest.raises(KeyError, match="missing"):
        keymap.file_name("a.1")
    with pytest.raises(ValueError, match="unsupported expression"):
        KeyMap((Rule("a.{i}", "b.{i ** 2}"),)).file_name("a.1")


def test_importing_keymap_and_dtypes_does_not_import_torch():
    code = "import sys, diffcore.keymap, diffcore.dtypes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dtype_names():
    from diffcore.dtypes import canonical, torch_dtype

    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("float16") is torch.float16
    assert torch_dtype("fp32") is torch.float32 and canonical("torch.bfloat16") == "bfloat16"
    with pytest.raises(UserError, match="unknown dtype 'half'.*fp16") as info:
        torch_dtype("half", where="$.model.dtype")
    assert info.value.where == "$.model.dtype"
