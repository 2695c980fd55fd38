"""Job configuration: inheritance, overrides, and the exact messages users see for mistakes."""

import subprocess
import sys
import textwrap

import pytest

from diffcore.config.job import apply_overrides, deep_merge, load_job, read_yaml
from diffcore.errors import ConfigError, UserError

BASE = """
name: base
seed: 3
model: {type: example-tiny, width: 16}
data: {type: folder, path: DATA}
train: {steps: 10, lr: 0.001, batch_size: 2}
"""


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def job_file(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "base.yaml", BASE.replace("DATA", str(tmp_path / "data")))
    return write(
        tmp_path / "job.yaml",
        """
        _base_: base.yaml
        name: child
        model: {width: 24}
        train: {steps: 20}
        """,
    )


def problems(exc):
    return [f"{p.path}: {p.message}" for p in exc.problems]


def test_base_inheritance_deep_merges(job_file):
    data = read_yaml(job_file)
    assert data["name"] == "child"
    assert data["model"] == {"type": "example-tiny", "width": 24}
    assert data["train"] == {"steps": 20, "lr": 0.001, "batch_size": 2}
    assert data["seed"] == 3


def test_changing_a_section_type_replaces_it_whole():
    merged = deep_merge({"model": {"type": "a", "x": 1}}, {"model": {"type": "b", "y": 2}})
    assert merged["model"] == {"type": "b", "y": 2}


def test_set_overrides_parse_to_the_field_type(job_file):
    job = load_job(job_file, ["train.lr=1e-4", "train.steps=7", "model.width=8", "train.ema_decay=0.99", "name=123"])
    assert job.train.lr == pytest.approx(1e-4) and isinstance(job.train.lr, float)
    assert job.train.steps == 7
    assert job.model.config.width == 8
    assert job.train.ema_decay == pytest.approx(0.99)
    assert job.name == "123"


def test_set_into_list_items():
    data = apply_overrides({"callbacks": [{"type": "sample", "every": 5}]}, ["callbacks.0.every=10"])
    assert data["callbacks"][0]["every"] == 10


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lr", "--set: bad --set 'train.lr' (write --set dotted.key=value, e.g. --set train.lr=1e-4)"),
        ("=3", "--set: bad --set '=3' (write --set dotted.key=value, e.g. --set train.lr=1e-4)"),
        ("train..lr=3", "--set: bad --set 'train..lr=3' (write --set dotted.key=value, e.g. --set train.lr=1e-4)"),
        ("callbacks.5.every=1", "--set: cannot set 'callbacks.5.every': '5' is not an index of a list of 0"),
    ],
)
def test_bad_set_messages(item, message):
    with pytest.raises(UserError) as err:
        apply_overrides({"callbacks": []}, [item])
    assert err.value.render() == message


def test_every_problem_is_reported_together_with_paths(job_file):
    with pytest.raises(ConfigError) as err:
        load_job(
            job_file,
            ["model.widht=3", "train.lr=fast", "train.stpes=3", "train.mixed_precision=fp8", "scheduler.type=ddmp",
             "callbacks=[{type: progres}]", "trian.x=1"],
        )
    got = problems(err.value)
    assert "$.trian: unknown section; did you mean 'train'?" in got
    assert "$.model.widht: unknown key; did you mean 'width'?" in got
    assert "$.train.lr: expected a number, got 'fast'" in got
    assert "$.train.stpes: unknown key; did you mean 'steps'?" in got
    assert "$.train.mixed_precision: expected one of 'no', 'fp16', 'bf16', got 'fp8'" in got
    assert any(p.startswith("$.scheduler.type: unknown scheduler 'ddmp'; did you mean 'ddpm'?") for p in got)
    assert any(p.startswith("$.callbacks[0].type: unknown callback 'progres'; did you mean 'progress'?") for p in got)
    assert str(err.value).startswith(f"{job_file}: 7 problems in the job")


def test_wrong_types(job_file):
    with pytest.raises(ConfigError) as err:
        load_job(job_file, ["train.steps=1.5", "train.gradient_checkpointing=maybe", "seed=abc", "train.batch_size=0"])
    got = problems(err.value)
    assert "$.train.steps: expected an integer, got 1.5" in got
    assert "$.train.gradient_checkpointing: expected true or false, got 'maybe'" in got
    assert "$.seed: expected an integer, got 'abc'" in got
    assert "$.train.batch_size: must be at least 1, got 0" in got


def test_unknown_first_party_component_names_the_distribution(job_file, monkeypatch):
    monkeypatch.setenv("DIFFCORE_DISABLE_PLUGINS", "diffcore-flux")
    with pytest.raises(ConfigError) as err:
        load_job(job_file, ["adapter.type=lokr2", "model.type=flux"])
    got = problems(err.value)
    hint = "it is provided by diffcore-flux, which is installed but disabled by DIFFCORE_DISABLE_PLUGINS"
    assert any("unknown model 'flux'" in p and hint in p for p in got), got
    # no distribution provides sd3 yet: no pip hint naming one that does not exist
    with pytest.raises(ConfigError) as err:
        load_job(job_file, ["model.type=sd3"])
    assert "pip install" not in str(err.value)


def test_missing_required_sections(tmp_path):
    path = write(tmp_path / "j.yaml", "name: x\n")
    with pytest.raises(ConfigError) as err:
        load_job(path)
    got = problems(err.value)
    assert "$.model: required section missing (give it a type: naming a model)" in got
    assert "$.data: required section missing (give it a type: naming a dataset)" in got


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "j.yaml", "model: {type: x\ntrain: [\n")
    with pytest.raises(UserError) as err:
        load_job(path)
    assert err.value.render().startswith(f"{path}:")
    assert "invalid YAML" in err.value.render()


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(UserError) as err:
        load_job(tmp_path / "a.yaml")
    assert "_base_ files include each other" in err.value.render()


def test_cli_validate_exit_codes_and_one_message(job_file):
    ok = subprocess.run([sys.executable, "-m", "diffcore.cli", "validate", str(job_file)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "diffcore.cli", "validate", str(job_file), "--set", "train.stpes=3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr == f"diffcore: error: {job_file}: 1 problem in the job\n  $.train.stpes: unknown key; did you mean 'steps'?\n"
    assert "Traceback" not in bad.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "diffcore.cli", "--debug", "validate", str(job_file), "--set", "train.stpes=3"],
        capture_output=True,
        text=True,
    )
    assert "Traceback" in debug.stderr


def test_a_failed_range_check_is_reported_once(job_file):
    with pytest.raises(ConfigError) as err:
        load_job(job_file, ["train.steps=-3"])
    assert problems(err.value) == ["$.train.steps: must be at least 1, got -3"]


BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


@pytest.mark.parametrize("where", ["name: *i", "train: {steps: *i}"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, where):
    """Nine levels of nine aliases describe 9**9 values; the job is refused before anything walks them."""
    import resource
    import time

    path = write(tmp_path / "bomb.yaml", BOMB + where + "\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_job(path)
    assert time.perf_counter() - start < 1.0
    # ru_maxrss is in KiB on Linux: the peak grew by less than 50 MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000
    assert "expands to more than 100000 values through anchors and aliases" in err.value.render()
    assert str(path) in err.value.render()


def test_aliases_within_the_bound_still_work(tmp_path):
    path = write(
        tmp_path / "job.yaml",
        """
        name: aliased
        model: &m {type: example-tiny, width: 16}
        data: {type: synthetic, resolution: 8}
        method: {type: diffusion}
        callbacks: [{type: loss-history}]
        train: {steps: &s 7, warmup_steps: *s}
        """,
    )
    job = load_job(path)
    assert job.train.steps == job.train.warmup_steps == 7


def test_a_job_file_that_is_not_utf8_is_one_message(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(UserError) as err:
        read_yaml(path)
    assert err.value.render().startswith(f"{path}: the job file is not UTF-8 text")
