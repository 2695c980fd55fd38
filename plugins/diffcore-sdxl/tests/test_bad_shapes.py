"""Single files (and options) whose sizes cannot describe an SD/SDXL UNet are one-line user errors
naming the option to set, never a raw ValueError from GroupNorm or the attention heads."""

from __future__ import annotations

import pytest
import yaml

import diffcore
from diffcore.errors import UserError
from diffcore.testing import run_cli

# a tiny SD1.5-shaped UNet whose widths SD's 32 norm groups and 8 heads do not divide
NARROW = {
    "block_out_channels": [12, 24, 24],
    "attention": [True, True, False],
    "transformer_layers": [1, 1, 1],
    "heads": [2, 2, 2],
    "cross_attention_dim": 64,
    "norm_groups": 4,
}


@pytest.fixture(scope="module")
def narrow_file(tmp_path_factory):
    model = diffcore.load_model("sd15", unet=NARROW, load_encoders=False)
    return model.save_pretrained(tmp_path_factory.mktemp("sd15") / "narrow.safetensors", layout="original")


def test_norm_groups_a_file_cannot_state_are_named(narrow_file):
    with pytest.raises(UserError) as caught:
        diffcore.load_model("sd15", pretrained=str(narrow_file), load_encoders=False)
    err = caught.value
    assert err.where == "$.model.unet.norm_groups"
    assert "[12, 24, 24]" in err.message and str(narrow_file) in err.message
    assert "e.g. 12" in (err.hint or "") and "\n" not in str(err)


def test_heads_that_do_not_divide_a_level_are_named(narrow_file):
    with pytest.raises(UserError) as caught:  # SD1's 8 heads do not divide 12
        diffcore.load_model("sd15", pretrained=str(narrow_file), load_encoders=False, unet={"norm_groups": 4})
    assert caught.value.where == "$.model.unet.heads" and "12 wide" in caught.value.message
    # with both options set, as the messages say, the file loads
    model = diffcore.load_model(
        "sd15", pretrained=str(narrow_file), load_encoders=False, unet={"norm_groups": 4, "heads": [2, 2, 2]}
    )
    assert model.backbone.config.block_out_channels == (12, 24, 24)


def test_a_unet_without_cross_attention_is_named(tmp_path, narrow_file):
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(narrow_file)).items() if ".1.transformer_blocks." not in k}
    tensors = {k: v for k, v in tensors.items() if "proj_in" not in k}
    save_file(tensors, str(tmp_path / "no_attention.safetensors"))
    with pytest.raises(UserError, match="no cross-attention layers") as caught:
        diffcore.load_model("sd15", pretrained=str(tmp_path / "no_attention.safetensors"), load_encoders=False)
    assert caught.value.where == str(tmp_path / "no_attention.safetensors")


def test_random_init_options_are_checked():
    with pytest.raises(UserError) as caught:
        diffcore.load_model("sd15", unet={**NARROW, "norm_groups": 8}, load_encoders=False)
    assert caught.value.where == "$.model.unet.norm_groups"


def test_cli_exits_2_with_one_line(tmp_path, narrow_file):
    job = {
        "model": {"type": "sd15", "pretrained": str(narrow_file), "load_encoders": False},
        "data": {"type": "synthetic", "resolution": 16, "size": 4},
        "train": {"steps": 1, "batch_size": 2},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    done = run_cli("run", str(tmp_path / "job.yaml"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "$.model.unet.norm_groups" in lines[0] and "Traceback" not in done.stderr
