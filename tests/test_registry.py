"""Plugin discovery through real entry points: each way a plugin can go wrong is reported, keeps
none of that plugin's components, and leaves every other plugin working."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

import diffcore
from diffcore.cli import main
from diffcore.config.job import LIST_SECTIONS, PLUGIN_SECTIONS, TRAIN_SECTIONS, structure_job
from diffcore.errors import PluginError, UserError
from diffcore.kinds import KINDS
from diffcore.registry import FIRST_PARTY, FailedPlugin, PluginInfo, PluginWarning, Registry, build_registry

ROOT = Path(__file__).resolve().parents[1]


def make_dist(root, dist, version, entry_points, modules, requires=()):
    """A minimal installed distribution on sys.path: dist-info metadata, entry points, modules."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    meta = ["Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
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

# a plugin that registers a shared name and one of its own
TWO_MODELS = """
import attrs, diffcore

@attrs.define
class Cfg:
    size: int = 1

@diffcore.hookimpl
def diffcore_register_models():
    return [diffcore.ModelSpec(name="{shared}", config=Cfg, factory=lambda c: c),
            diffcore.ModelSpec(name="{own}", config=Cfg, factory=lambda c: c)]
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DIFFCORE_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("DIFFCORE_NO_PLUGINS", raising=False)
    before = set(sys.modules)
    yield tmp_path
    # the test plugins' modules reuse names across tests
    for name in set(sys.modules) - before:
        if name.startswith("dc_"):
            del sys.modules[name]


def with_good(path):
    make_dist(path, "diffcore-good", "1.2.3", {"good": "dc_good"}, {"dc_good": GOOD.format(name="goodmodel")})


def assert_good_works(reg):
    assert reg.get("model", "goodmodel").distribution == "diffcore-good"
    assert "adamw" in reg.names("optimizer")


def plugins_output(*args):
    """`diffcore plugins` run in-process against what is on sys.path: (exit status, stdout, stderr)."""
    import io
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    from diffcore.registry import set_registry

    set_registry(None)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # the listing holds them; stderr is tested apart
        code = main(["plugins", *args])
    return code, out.getvalue(), err.getvalue()


# -- a plugin that fails to import -----------------------------------------------------------------
def test_broken_plugin_is_recorded_and_others_load(plugin_path):
    with_good(plugin_path)
    make_dist(
        plugin_path, "diffcore-broken", "0.0.1", {"broken": "dc_broken"},
        {"dc_broken": "import this_module_does_not_exist\n"},
    )
    reg = build_registry(autoload=True, disabled=[])
    assert_good_works(reg)
    failed = {f.name: f for f in reg.failed}
    assert failed["broken"].distribution == "diffcore-broken"
    assert failed["broken"].version == "0.0.1"
    assert "ModuleNotFoundError" in failed["broken"].error
    assert "this_module_does_not_exist" in failed["broken"].error


# -- a misspelt hook -------------------------------------------------------------------------------
MISSPELT = """
import attrs, diffcore

@attrs.define
class Cfg:
    pass

@diffcore.hookimpl
def diffcore_register_model():
    return [diffcore.ModelSpec(name="lost", config=Cfg, factory=lambda c: c)]

@diffcore.hookimpl
def diffcore_register_callbacks():
    return [diffcore.CallbackSpec(name="also-lost", config=Cfg, factory=lambda c: c)]
"""


def test_misspelt_hook_fails_the_plugin_naming_the_nearest_hook(plugin_path):
    with_good(plugin_path)
    make_dist(plugin_path, "diffcore-typo", "1.0", {"typo": "dc_typo"}, {"dc_typo": MISSPELT})
    reg = build_registry(autoload=True, disabled=[])
    assert_good_works(reg)
    (failed,) = [f for f in reg.failed if f.name == "typo"]
    assert "'diffcore_register_model'" in failed.error
    assert "did you mean 'diffcore_register_models'?" in failed.error
    # none of its components, not even the ones from correctly spelt hooks
    assert "also-lost" not in reg.names("callback") and "lost" not in reg.names("model")
    assert "typo" not in [p.name for p in reg.plugins]
    code, out, _ = plugins_output()
    assert code == 0
    assert "diffcore-typo 1.0 (typo) FAILED to load: implements 'diffcore_register_model'" in out
    assert "diffcore-good 1.2.3 (good)" in out


# -- all or nothing ----------------------------------------------------------------------------------
SECOND_INVALID = """
import attrs, diffcore

@attrs.define
class Cfg:
    pass

class NotAttrs:
    pass

@diffcore.hookimpl
def diffcore_register_models():
    return [diffcore.ModelSpec(name="first-ok", config=Cfg, factory=lambda c: c),
            diffcore.ModelSpec(name="second-bad", config=NotAttrs, factory=lambda c: c)]
"""

WRONG_RECORD_IN_LATER_HOOK = """
import attrs, diffcore

@attrs.define
class Cfg:
    pass

@diffcore.hookimpl
def diffcore_register_models():
    return [diffcore.ModelSpec(name="kept-out", config=Cfg, factory=lambda c: c)]

@diffcore.hookimpl
def diffcore_register_optimizers():
    return [diffcore.CallbackSpec(name="oops", config=Cfg, factory=lambda c: c)]
"""


def test_plugin_whose_second_record_is_invalid_keeps_none(plugin_path):
    with_good(plugin_path)
    make_dist(plugin_path, "diffcore-half", "1.0", {"half": "dc_half"}, {"dc_half": SECOND_INVALID})
    make_dist(plugin_path, "diffcore-wrong", "1.0", {"wrong": "dc_wrong"}, {"dc_wrong": WRONG_RECORD_IN_LATER_HOOK})
    reg = build_registry(autoload=True, disabled=[])
    assert_good_works(reg)
    failed = {f.name: f for f in reg.failed}
    assert "the model 'second-bad' has config" in failed["half"].error
    assert "not an attrs class" in failed["half"].error
    assert "not a OptimizerSpec" in failed["wrong"].error
    assert "first-ok" not in reg.names("model") and "kept-out" not in reg.names("model")
    assert not {"half", "wrong"} & {p.name for p in reg.plugins}
    # asking for the valid record of the failed plugin says why it is missing
    with pytest.raises(UserError, match="provided by diffcore-half, which is installed but failed to load: the model"):
        reg.get("model", "first-ok")


def test_in_process_registration_is_all_or_nothing_too():
    @attrs.define
    class Cfg:
        pass

    class Half:
        @diffcore.hookimpl
        def diffcore_register_samplers(self):
            return [diffcore.SamplerSpec(name="fine", config=Cfg, factory=lambda c: c), "not a record"]

    reg = build_registry(autoload=False)
    half = Half()
    with pytest.raises(PluginError, match="yielded 'not a record', not a SamplerSpec"):
        reg.register(half, PluginInfo(name="half", distribution="test", version="0"))
    assert "fine" not in reg.names("sampler")
    assert [p.name for p in reg.plugins] == ["builtin"]
    assert not reg.pm.is_registered(half)


def test_bad_record_name_is_rejected():
    with pytest.raises(ValueError, match="must be letters, digits"):
        diffcore.ModelSpec(name="has space", config=object, factory=print)


# -- clashes ----------------------------------------------------------------------------------------
def test_two_plugins_claiming_one_name_make_only_that_name_unusable(plugin_path, tmp_path):
    make_dist(plugin_path, "diffcore-one", "1.0", {"one": "dc_one"},
              {"dc_one": TWO_MODELS.format(shared="samename", own="only-one")})
    make_dist(plugin_path, "diffcore-two", "2.0", {"two": "dc_two"},
              {"dc_two": TWO_MODELS.format(shared="samename", own="only-two")})
    with_good(plugin_path)
    reg = build_registry(autoload=True, disabled=[])
    assert_good_works(reg)
    assert reg.get("model", "only-one").distribution == "diffcore-one"
    assert reg.get("model", "only-two").distribution == "diffcore-two"
    assert "samename" not in reg.names("model")
    with pytest.raises(UserError) as err:
        reg.get("model", "samename", where="$.model.type")
    message = str(err.value)
    assert message.startswith("$.model.type: the model 'samename' is registered by both ")
    assert "diffcore-one (plugin 'one') and diffcore-two (plugin 'two')" in message
    assert "DIFFCORE_DISABLE_PLUGINS=one or DIFFCORE_DISABLE_PLUGINS=two" in message
    # an unrelated job still validates; one naming the clash gets the message at its path
    job = {"model": {"type": "only-two"}, "data": {"type": "synthetic", "resolution": 8}}
    assert structure_job(job, registry=reg).model.type == "only-two"
    with pytest.raises(diffcore.ConfigError, match=r"\$\.model\.type: the model 'samename' is registered by both"):
        structure_job({**job, "model": {"type": "samename"}}, registry=reg)
    code, out, _ = plugins_output("--json")
    assert code == 0
    data = json.loads(out)
    assert data["clashes"] == [
        {
            "kind": "model",
            "name": "samename",
            "providers": [{"distribution": "diffcore-one", "plugin": "one"}, {"distribution": "diffcore-two", "plugin": "two"}],
        }
    ]
    code, out, _ = plugins_output()
    assert "CLASH: the model 'samename' is registered by diffcore-one (plugin 'one') and diffcore-two" in out


def test_disable_by_entry_point_or_distribution_resolves_a_clash(plugin_path, monkeypatch):
    make_dist(plugin_path, "diffcore-one", "1.0", {"one": "dc_one"}, {"dc_one": GOOD.format(name="samename")})
    make_dist(plugin_path, "diffcore-two", "2.0", {"two": "dc_two"}, {"dc_two": GOOD.format(name="samename")})
    monkeypatch.setenv("DIFFCORE_DISABLE_PLUGINS", "two")
    assert build_registry(autoload=True).get("model", "samename").distribution == "diffcore-one"
    monkeypatch.setenv("DIFFCORE_DISABLE_PLUGINS", "diffcore-one")
    reg = build_registry(autoload=True)
    assert reg.get("model", "samename").distribution == "diffcore-two"
    assert [(d.name, d.distribution, d.version) for d in reg.disabled] == [("one", "diffcore-one", "1.0")]


# -- the plugin API version ---------------------------------------------------------------------------
def test_plugin_built_for_another_api_is_reported_and_not_imported(plugin_path):
    with_good(plugin_path)
    make_dist(
        plugin_path, "diffcore-old", "0.9", {"old": "dc_old"},
        {"dc_old": "raise RuntimeError('imported although built for another API')\n"},
        requires=["diffcore>=0.1,<0.2", "pillow"],
    )
    make_dist(
        plugin_path, "diffcore-current", "1.0", {"current": "dc_current"},
        {"dc_current": GOOD.format(name="current-model")},
        requires=["diffcore>=0.2,<0.3", "diffcore==0.1; extra == 'legacy'"],
    )
    reg = build_registry(autoload=True, disabled=[])
    assert_good_works(reg)
    (failed,) = [f for f in reg.failed if f.name == "old"]
    assert failed.error == "built for diffcore >=0.1,<0.2; this is diffcore 0.2.0 (plugin API 0.2)"
    assert "dc_old" not in sys.modules
    assert reg.get("model", "current-model").distribution == "diffcore-current"
    code, out, _ = plugins_output()
    assert "diffcore-old 0.9 (old) FAILED to load: built for diffcore >=0.1,<0.2" in out


def test_version_and_plugin_api():
    assert diffcore.__version__ == "0.2.0" and diffcore.PLUGIN_API == "0.2"
    assert diffcore.__version__.startswith(diffcore.PLUGIN_API + ".")
    text = (ROOT / "pyproject.toml").read_text()
    assert 'version = "0.2.0"' in text and '"packaging' in text


def test_every_plugin_pins_the_plugin_api():
    tomllib = pytest.importorskip("tomllib")
    pins = {}
    for pyproject in sorted([*ROOT.glob("plugins/*/pyproject.toml"), *ROOT.glob("contrib/*/pyproject.toml")]):
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        pins[pyproject.parent.name] = [d for d in deps if d.split(">")[0].split("=")[0].split("<")[0].strip() == "diffcore"]
    assert pins and all(found == ["diffcore>=0.2,<0.3"] for found in pins.values()), pins


def test_versions_name_diffcore_and_every_loaded_plugin(plugin_path):
    with_good(plugin_path)
    make_dist(plugin_path, "diffcore-broken", "0.1", {"broken": "dc_broken"}, {"dc_broken": "raise ImportError('x')\n"})
    versions = build_registry(autoload=True, disabled=[]).versions()
    assert versions["diffcore"] == "0.2.0" and versions["diffcore-good"] == "1.2.3"
    assert "diffcore-broken" not in versions


# -- disabling ------------------------------------------------------------------------------------------
def test_disabled_plugins_are_listed_and_misspelt_names_warned(plugin_path, monkeypatch):
    with_good(plugin_path)
    make_dist(plugin_path, "diffcore-two", "2.0", {"two": "dc_two"}, {"dc_two": GOOD.format(name="twomodel")})
    monkeypatch.setenv("DIFFCORE_DISABLE_PLUGINS", "diffcore-two, diffcore-god")
    with pytest.warns(PluginWarning, match="names 'diffcore-god', which is no installed plugin or distribution; did you mean 'diffcore-good'"):
        reg = build_registry(autoload=True)
    assert_good_works(reg)
    assert "twomodel" not in reg.names("model")
    code, out, err = plugins_output("--json")
    data = json.loads(out)
    assert data["disabled"] == [{"name": "two", "distribution": "diffcore-two", "version": "2.0"}]
    assert any("'diffcore-god'" in w for w in data["warnings"])
    code, out, err = plugins_output()
    assert "diffcore-two 2.0 (two) disabled by DIFFCORE_DISABLE_PLUGINS" in out
    assert "WARNING: DIFFCORE_DISABLE_PLUGINS names 'diffcore-god'" in out


def test_cli_prints_plugin_warnings_once_on_stderr(plugin_path):
    with_good(plugin_path)
    env = dict(os.environ, PYTHONPATH=str(plugin_path), DIFFCORE_DISABLE_PLUGINS="diffcore-god")
    out = subprocess.run([sys.executable, "-m", "diffcore.cli", "plugins"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    assert out.stderr == (
        "diffcore: warning: DIFFCORE_DISABLE_PLUGINS names 'diffcore-god', which is no installed plugin or "
        "distribution; did you mean 'diffcore-good'?\n"
    )


# -- heavy imports at discovery ----------------------------------------------------------------------
HEAVY = """
import attrs, diffcore, torch

@attrs.define
class Cfg:
    pass

@diffcore.hookimpl
def diffcore_register_models():
    return [diffcore.ModelSpec(name="heavymodel", config=Cfg, factory=lambda c: c)]
"""


def test_plugin_importing_torch_at_discovery_is_named_in_a_warning(plugin_path):
    with_good(plugin_path)
    make_dist(plugin_path, "diffcore-heavy", "1.0", {"heavy": "dc_heavy"}, {"dc_heavy": HEAVY})
    env = dict(os.environ, PYTHONPATH=str(plugin_path))
    env.pop("DIFFCORE_DISABLE_PLUGINS", None)
    out = subprocess.run(
        [sys.executable, "-m", "diffcore.cli", "plugins", "--json"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    heavy = [w for w in data["warnings"] if "imports" in w]
    assert len(heavy) == 1 and heavy[0].startswith("plugin 'heavy' (diffcore-heavy) imports torch when it is discovered")
    assert "diffcore: warning: plugin 'heavy' (diffcore-heavy) imports torch" in out.stderr
    # a warning, not a failure: it and every other plugin load
    registers = {p["name"]: p["registers"] for p in data["plugins"]}
    assert registers["heavy"] == {"model": ["heavymodel"]} and registers["good"] == {"model": ["goodmodel"]}


def test_discovery_does_not_import_torch():
    code = (
        "import sys\n"
        "from diffcore.registry import get_registry\n"
        "reg = get_registry()\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "print(heavy, reg.warnings, [f.name for f in reg.failed])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] [] []", out.stdout + out.stderr


# -- hints ----------------------------------------------------------------------------------------------
def test_unknown_component_names_closest_match_and_distribution():
    reg = build_registry(autoload=False)
    with pytest.raises(UserError) as err:
        reg.get("optimizer", "adamv")
    assert "unknown optimizer 'adamv'; did you mean 'adamw'?" in str(err.value)
    assert reg.unknown_message("model", "flux").endswith("; it is provided by diffcore-flux: pip install diffcore-flux")
    # no first-party distribution provides these (yet): no invented pip hint
    for kind, name in (("model", "sd3"), ("method", "dreambooth"), ("method", "controlnet")):
        assert "pip install" not in reg.unknown_message(kind, name)


def test_first_party_hints_name_distributions_that_exist_and_provide_the_name():
    installed = build_registry(autoload=True, disabled=[])
    for kind, names in FIRST_PARTY.items():
        for name, dist in names.items():
            assert (ROOT / "plugins" / dist / "pyproject.toml").is_file(), dist
            assert installed.get(kind, name).distribution == dist, (kind, name)


def test_hint_says_when_the_providing_plugin_is_disabled_or_failed():
    reg = build_registry(autoload=True, disabled=["diffcore-flux"])
    assert reg.unknown_message("model", "flux").endswith(
        "; it is provided by diffcore-flux, which is installed but disabled by DIFFCORE_DISABLE_PLUGINS"
    )
    failed = Registry()
    failed.failed.append(FailedPlugin("flux", "diffcore-flux", "0.1.0", "ImportError: no module named x"))
    assert failed.unknown_message("model", "flux").endswith(
        "; it is provided by diffcore-flux, which is installed but failed to load: ImportError: no module named x"
    )


# -- diffcore plugins ---------------------------------------------------------------------------------------
def test_plugins_json_lists_builtin_and_failures(plugin_path):
    make_dist(
        plugin_path, "diffcore-broken", "0.0.1", {"broken": "dc_broken"}, {"dc_broken": "raise RuntimeError('boom')\n"}
    )
    code = f"import sys; sys.path.insert(0, {str(plugin_path)!r}); from diffcore.cli import main; sys.exit(main(['plugins', '--json']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["diffcore"], data["plugin_api"]) == ("0.2.0", "0.2")
    names = {p["name"]: p for p in data["plugins"]}
    assert names["builtin"]["version"] == "0.2.0"
    assert {"optimizer", "sampler", "loss_weighting", "command"} <= set(names["builtin"]["registers"])
    failed = {f["name"]: f for f in data["failed"]}
    assert failed["broken"]["distribution"] == "diffcore-broken"
    assert "RuntimeError: boom" in failed["broken"]["error"]


@pytest.mark.parametrize("args", [["plugins", "--json"], ["plugins"]])
def test_plugins_into_a_closed_pipe_exits_quietly(args):
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "diffcore.cli", *args], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    os.close(read)  # the reader is gone before diffcore writes a byte
    _, err = proc.communicate(timeout=60)
    assert err == b"" and proc.returncode in (0, 141)


def test_plugins_json_piped_to_head():
    out = subprocess.run(
        f"set -o pipefail; '{sys.executable}' -m diffcore.cli plugins --json | head -1",
        shell=True, capture_output=True, text=True, executable="/bin/bash",
    )
    assert out.stdout == "{\n" and out.stderr == ""
    assert out.returncode in (0, 141)


# -- the kinds table --------------------------------------------------------------------------------------
def test_one_kinds_table_drives_records_hooks_sections():
    reg = build_registry(autoload=False)
    for kind in KINDS.values():
        assert getattr(diffcore, kind.record.__name__) is kind.record
        assert reg.pm.hook.__dict__[kind.hook].has_spec()
        assert kind.name in reg.components
    assert {"sampler", "text_encoder", "loss_weighting", "command"} <= set(KINDS)
    sections = {**PLUGIN_SECTIONS, **{f"train.{k}": v for k, v in TRAIN_SECTIONS.items()}, **LIST_SECTIONS}
    assert sections == {k.section: k.name for k in KINDS.values() if k.section is not None}
    assert sections["train.loss_weighting"] == "loss_weighting" and sections["data"] == "dataset"


def test_no_plugins_env_keeps_only_builtins(plugin_path, monkeypatch):
    with_good(plugin_path)
    monkeypatch.setenv("DIFFCORE_NO_PLUGINS", "1")
    reg = build_registry()
    assert [p.name for p in reg.plugins] == ["builtin"]
    assert "goodmodel" not in reg.names("model")
    assert "adamw" in reg.names("optimizer")
