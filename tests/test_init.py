"""``diffcore init`` writes commented jobs that ``diffcore validate`` accepts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from diffcore.cli import main


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for name in ("cat", "dog", "fox"):
        (folder / name).mkdir(parents=True)
    return folder


@pytest.mark.parametrize(
    ("model", "method", "plugin"),
    [("dit", None, "diffcore_dit"), ("sdxl", "lora", "diffcore_sdxl"), ("flux", "lora", "diffcore_flux")],
)
def test_written_job_validates(tmp_path: Path, images: Path, model: str, method: str | None, plugin: str, capsys) -> None:
    pytest.importorskip(plugin)
    pytest.importorskip("diffcore_lora")
    job = tmp_path / f"{model}.yaml"
    args = ["init", "--model", model, "--data", str(images), "--resolution", "64", "--rank", "8", "-o", str(job)]
    if method:
        args += ["--method", method]
    assert main(args) == 0
    assert main(["validate", str(job)]) == 0
    assert f"{job}: ok (model {model}" in capsys.readouterr().out
    text = job.read_text()
    loaded = yaml.safe_load(text)
    assert loaded["model"]["type"] == model
    assert loaded["data"]["path"] == str(images) and loaded["data"]["resolution"] == 64
    assert "# POINT THIS AT YOUR IMAGES" in text
    if model == "dit":
        assert "adapter" not in loaded  # DiT trains in full by default
        assert loaded["model"]["num_classes"] == 3  # counted from the class folders
        assert loaded["data"]["labels"] == "folders"
    else:
        assert loaded["adapter"] == {"type": "lora", "rank": 8, "alpha": 8}
        assert "# POINT THIS AT YOUR FILES" in text and "pretrained" in loaded["model"]


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    pytest.importorskip("diffcore_dit")
    job = tmp_path / "job.yaml"
    job.write_text("mine\n")
    assert main(["init", "--model", "dit", "--data", "x", "-o", str(job)]) == 2
    assert "already exists" in capsys.readouterr().err and job.read_text() == "mine\n"
    assert main(["init", "--model", "dit", "--data", "x", "-o", str(job), "--force"]) == 0
    assert yaml.safe_load(job.read_text())["model"]["type"] == "dit"


def test_without_a_terminal_a_missing_flag_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert main(["init", "-o", str(tmp_path / "job.yaml")]) == 2
    assert "--model" in capsys.readouterr().err
    assert not (tmp_path / "job.yaml").exists()


def test_unknown_method_lists_the_choices(tmp_path: Path, capsys) -> None:
    pytest.importorskip("diffcore_dit")
    assert main(["init", "--model", "dit", "--method", "lorra", "--data", "x", "-o", str(tmp_path / "j.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--method" in err and "full" in err


def test_on_a_terminal_it_asks(tmp_path: Path, images: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("diffcore_sdxl")
    pytest.importorskip("diffcore_lora")

    class Terminal:
        def isatty(self) -> bool:
            return True

    answers = iter(["sdxl", "/models/sdxl", str(images), "", "32"])  # resolution: the default
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    job = tmp_path / "asked.yaml"
    assert main(["init", "-o", str(job)]) == 0
    loaded = yaml.safe_load(job.read_text())
    assert loaded["model"] == {"type": "sdxl", "pretrained": "/models/sdxl", "resolution": 1024, "dtype": "bfloat16"}
    assert loaded["data"]["path"] == str(images) and loaded["data"]["resolution"] == 1024
    assert loaded["adapter"]["rank"] == 32
    assert main(["validate", str(job)]) == 0
