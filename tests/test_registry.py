"""Plugin discovery through real entry points: broken plugins, duplicate names, disabling."""

import json
import subprocess
import sys
import textwrap

import pytest

from diffcore.errors import PluginError, UserError
from diffcore.registry import build_registry


def make_dist(root, dist, version, entry_points, modules):
    """A minimal installed distribution on sys.path: dist-info metadata, entry points, modules."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[diffcore.plugins]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))


GOOD = """
import attrs, diffcore

@attrs.define
class Cfg:
    size: int = 1

@diffcore.hookimpl
def diffcore_register_models():
    return [diffcore.ModelSpec(name="{name}", config=Cfg, factory=lambda c: c)]
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_broken_plugin_is_recorded_and_others_load(plugin_path):
    make_dist(plugin_path, "diffcore-good", "1.2.3", {"good": "dc_good"}, {"dc_good": GOOD.format(name="goodmodel")})
    make_dist(
        plugin_path, "diffcore-broken", "0.0.1", {"broken": "dc_broken"},
        {"dc_broken": "import this_module_does_not_exist\n"},
    )
    reg = build_registry(autoload=True, disabled=[])
    assert "goodmodel" in reg.names("model")
    assert reg.get("model", "goodmodel").distribution == "diffcore-good"
    failed = {f.name: f for f in reg.failed}
    assert failed["broken"].distribution == "diffcore-broken"
    assert failed["broken"].version == "0.0.1"
    assert "ModuleNotFoundError" in failed["broken"].error
    assert "this_module_does_not_exist" in failed["broken"].error


def test_two_plugins_claiming_one_name_is_an_error_naming_both(plugin_path):
    make_dist(plugin_path, "diffcore-one", "1.0", {"one": "dc_one"}, {"dc_one": GOOD.format(name="samename")})
    make_dist(plugin_path, "diffcore-two", "2.0", {"two": "dc_two"}, {"dc_two": GOOD.format(name="samename")})
    with pytest.raises(PluginError) as err:
        build_registry(autoload=True, disabled=[])
    message = str(err.value)
    assert "'samename'" in message
    assert "diffcore-one" in message and "diffcore-two" in message


def test_disable_by_entry_point_or_distribution(plugin_path, monkeypatch):
    make_dist(plugin_path, "diffcore-one", "1.0", {"one": "dc_one"}, {"dc_one": GOOD.format(name="samename")})
    make_dist(plugin_path, "diffcore-two", "2.0", {"two": "dc_two"}, {"dc_two": GOOD.format(name="samename")})
    monkeypatch.setenv("DIFFCORE_DISABLE_PLUGINS", "two")
    assert build_registry(autoload=True).get("model", "samename").distribution == "diffcore-one"
    monkeypatch.setenv("DIFFCORE_DISABLE_PLUGINS", "diffcore-one")
    assert build_registry(autoload=True).get("model", "samename").distribution == "diffcore-two"


def test_no_plugins_env_keeps_only_builtins(plugin_path, monkeypatch):
    make_dist(plugin_path, "diffcore-good", "1.0", {"good": "dc_good"}, {"dc_good": GOOD.format(name="goodmodel")})
    monkeypatch.setenv("DIFFCORE_NO_PLUGINS", "1")
    reg = build_registry()
    assert [p.name for p in reg.plugins] == ["builtin"]
    assert "goodmodel" not in reg.names("model")
    assert "adamw" in reg.names("optimizer")


def test_unknown_component_names_closest_match_and_distribution():
    reg = build_registry(autoload=False)
    with pytest.raises(UserError) as err:
        reg.get("optimizer", "adamv")
    assert "unknown optimizer 'adamv'; did you mean 'adamw'?" in str(err.value)
    message = reg.unknown_message("model", "flux")
    assert "pip install diffcore-flux" in message


def test_hook_yielding_wrong_record_type_is_recorded(plugin_path):
    bad = """
import attrs, diffcore
@attrs.define
class Cfg:
    pass
@diffcore.hookimpl
def diffcore_register_models():
    return [diffcore.CallbackSpec(name="oops", config=Cfg, factory=lambda c: c)]
"""
    make_dist(plugin_path, "diffcore-bad", "1.0", {"bad": "dc_bad"}, {"dc_bad": bad})
    reg = build_registry(autoload=True, disabled=[])
    assert any(f.name == "bad" and "not a ModelSpec" in f.error for f in reg.failed)


def test_discovery_does_not_import_torch():
    code = (
        "import sys\n"
        "from diffcore.registry import get_registry\n"
        "reg = get_registry()\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_plugins_json_lists_builtin_and_failures(plugin_path):
    make_dist(
        plugin_path, "diffcore-broken", "0.0.1", {"broken": "dc_broken"}, {"dc_broken": "raise RuntimeError('boom')\n"}
    )
    env_path = str(plugin_path)
    code = f"import sys; sys.path.insert(0, {env_path!r}); from diffcore.cli import main; sys.exit(main(['plugins', '--json']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    names = {p["name"]: p for p in data["plugins"]}
    assert "optimizer" in names["builtin"]["registers"]
    failed = {f["name"]: f for f in data["failed"]}
    assert failed["broken"]["distribution"] == "diffcore-broken"
    assert "RuntimeError: boom" in failed["broken"]["error"]
