"""locate(): pipeline folder, component folder (plain or sharded), single file, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffcore.errors import UserError
from diffcore.locate import locate, read_json


def _component(folder, config=True, sharded=False):
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text(json.dumps({"_class_name": "Thing", "num_layers": 2}))
    if sharded:
        save_file({"a": torch.ones(1)}, str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors"))
        save_file({"b": torch.zeros(2)}, str(folder / "diffusion_pytorch_model-00002-of-00002.safetensors"))
        index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({"a": torch.ones(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_pipeline_folder(tmp_path):
    _component(tmp_path / "transformer")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    found = locate(tmp_path, "transformer")
    assert found.kind == "pipeline" and found.pipeline == tmp_path
    assert found.path == tmp_path / "transformer" and found.config["num_layers"] == 2
    assert found.part("text_encoder") == tmp_path / "text_encoder" and found.part("vae") is None
    assert found.checkpoint().keys() == ["a"]
    # without model_index.json the sub-folder alone marks a pipeline
    (tmp_path / "model_index.json").unlink()
    assert locate(tmp_path, "transformer").kind == "pipeline"


def test_component_folder_plain_sharded_and_without_config(tmp_path):
    found = locate(_component(tmp_path / "unet"), "unet")
    assert found.kind == "component" and found.pipeline is None and found.config["_class_name"] == "Thing"
    assert found.part("vae") is None and not found.is_file
    sharded = locate(_component(tmp_path / "big", sharded=True))
    assert sorted(sharded.checkpoint().keys()) == ["a", "b"]
    bare = locate(_component(tmp_path / "bare", config=False), "vae")
    assert bare.kind == "component" and bare.config is None and bare.checkpoint().keys() == ["a"]


def test_single_file(tmp_path):
    file = tmp_path / "flux1-dev.safetensors"
    save_file({"img_in.weight": torch.ones(2, 2)}, str(file))
    found = locate(file)
    assert found.kind == "file" and found.is_file and found.config is None and found.where == str(file)
    assert "img_in.weight" in found.checkpoint()
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"never read")
    with pytest.raises(UserError, match="only .safetensors"):
        locate(pickled).checkpoint()


def test_errors_say_where_what_and_how(tmp_path):
    with pytest.raises(UserError, match="no such file or folder") as info:
        locate(tmp_path / "missing", "unet", what="an SDXL checkpoint")
    assert info.value.where == str(tmp_path / "missing") and "an SDXL checkpoint" in info.value.hint
    (tmp_path / "empty" / "other").mkdir(parents=True)
    with pytest.raises(UserError, match="not a Flux checkpoint: this folder holds no transformer/ folder") as info:
        locate(tmp_path / "empty", "transformer", what="a Flux checkpoint")
    assert "single .safetensors file" in info.value.hint
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="pipeline folder has no vae/ folder"):
        locate(tmp_path / "pipe", "vae")
    broken = _component(tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read config.json") as info:
        locate(broken)
    assert info.value.where == str(broken / "config.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(UserError, match="does not hold a JSON object"):
        read_json(tmp_path / "list.json")


def test_a_component_folder_with_its_own_config_wins_over_a_same_named_sub_folder(tmp_path):
    folder = _component(tmp_path / "vae_model")
    (folder / "vae").mkdir()  # a stray sub-folder that happens to share the component's name
    assert locate(folder, "vae").path == folder
