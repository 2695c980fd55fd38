"""Files and options whose sizes cannot describe a Flux transformer are one-line user errors naming
the option to set, never a raw ValueError from building the network."""

from __future__ import annotations

import json

import pytest
import yaml
from _flux_tiny import AXES, SIZES

import diffcore
from diffcore.errors import UserError
from diffcore.testing import run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny transformer (16-wide heads) as BFL's single file and as a diffusers-keyed single file."""
    root = tmp_path_factory.mktemp("flux-files")
    model = diffcore.load_model("flux", **{**SIZES, "depth": 1, "depth_single": 1})
    bfl = model.save_pretrained(root / "bfl.safetensors", layout="original")
    diffcore.weights.save_safetensors(model.export_state_dict("diffusers"), root / "diffusers_keys.safetensors")
    return bfl, root / "diffusers_keys.safetensors"


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_single_file_with_heads_the_default_axes_dim_does_not_fit(files, layout):
    file = files[0] if layout == "bfl" else files[1]
    # the default axes_dim [16, 56, 56] is for BFL's 128-wide heads; a file does not store it
    with pytest.raises(UserError) as caught:
        diffcore.load_model("flux", pretrained=file)
    err = caught.value
    assert err.where == "$.model.axes_dim"
    assert "head size 16" in err.message and str(file) in err.message
    assert "sum to 16" in (err.hint or "")
    assert "\n" not in str(err)
    loaded = diffcore.load_model("flux", pretrained=file, axes_dim=AXES)  # what the hint says works
    assert loaded.backbone.shape.axes_dim == tuple(AXES)


def test_folder_config_json_is_named_when_it_states_the_axes(tmp_path, files):
    model = diffcore.load_model("flux", pretrained=files[0], axes_dim=AXES)
    folder = model.save_pretrained(tmp_path / "transformer")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "axes_dims_rope": [2, 2, 2]}))
    with pytest.raises(UserError) as caught:
        diffcore.load_model("flux", pretrained=folder, axes_dim=AXES)
    assert caught.value.where == f"{folder / 'config.json'}: axes_dims_rope"


def test_random_init_sizes_name_their_options():
    with pytest.raises(UserError) as caught:
        diffcore.load_model("flux", **{**SIZES, "axes_dim": [4, 6, 8]})
    assert caught.value.where == "$.model.axes_dim" and "head size 16" in caught.value.message
    with pytest.raises(UserError) as caught:
        diffcore.load_model("flux", **{**SIZES, "axes_dim": [3, 7, 6]})  # sums to 16, but odd sizes
    assert caught.value.where == "$.model.axes_dim"
    with pytest.raises(UserError) as caught:
        diffcore.load_model("flux", **{**SIZES, "num_heads": 3})
    assert caught.value.where == "$.model.num_heads"


def test_cli_exits_2_with_one_line(tmp_path, files):
    job = {
        "model": {"type": "flux", "pretrained": str(files[0]), "load_encoders": False},
        "data": {"type": "synthetic", "resolution": 16, "size": 4},
        "train": {"steps": 1, "batch_size": 2},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    done = run_cli("run", str(tmp_path / "job.yaml"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "$.model.axes_dim" in lines[0] and "Traceback" not in done.stderr
