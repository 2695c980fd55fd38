"""`diffcore <name>` subcommands added by plugins through diffcore_register_commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffcore.cli import main
from tests.test_registry import make_dist

HELLO = """
import diffcore

def add_arguments(parser):
    parser.add_argument("--who", default="world")

def run(args):
    if args.who == "nobody":
        raise diffcore.UserError("nobody to greet", where="--who", hint="give a name")
    print(f"hello {args.who} from {NAME}")
    return 0

NAME = "{name}"

@diffcore.hookimpl
def diffcore_register_commands():
    return [diffcore.CommandSpec(name="{command}", description="say hello", add_arguments=add_arguments, run=run)]
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DIFFCORE_DISABLE_PLUGINS", raising=False)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("dc_"):
            del sys.modules[name]


def hello_plugin(path, dist, command="hello"):
    module = "dc_" + dist.replace("-", "_")
    source = HELLO.replace("{name}", dist).replace("{command}", command)
    make_dist(path, dist, "1.0", {dist.removeprefix("diffcore-"): module}, {module: source})


def test_plugin_command_runs_and_its_user_error_exits_2(plugin_path, capsys):
    hello_plugin(plugin_path, "diffcore-hello")
    assert main(["hello", "--who", "you"]) == 0
    assert capsys.readouterr().out == "hello you from diffcore-hello\n"
    assert main(["hello", "--who", "nobody"]) == 2
    assert capsys.readouterr().err == "diffcore: error: --who: nobody to greet (give a name)\n"


def test_help_lists_plugin_commands_without_importing_torch(plugin_path):
    hello_plugin(plugin_path, "diffcore-hello")
    env = dict(os.environ, PYTHONPATH=str(plugin_path))
    code = "import sys\nfrom diffcore.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "    hello     say hello" in out.stdout
    assert "    run       train a job" in out.stdout
    assert out.stdout.strip().endswith("False")


def test_two_plugins_claiming_one_command_make_only_it_unusable(plugin_path, capsys):
    hello_plugin(plugin_path, "diffcore-hello")
    hello_plugin(plugin_path, "diffcore-hi", command="hello")
    hello_plugin(plugin_path, "diffcore-own", command="own")
    assert main(["hello", "--who", "x"]) == 2
    err = capsys.readouterr().err
    assert "the command 'hello' is registered by both diffcore-hello (plugin 'hello') and diffcore-hi" in err
    assert main(["own"]) == 0
    assert capsys.readouterr().out == "hello world from diffcore-own\n"
    assert main(["plugins"]) == 0
    assert "CLASH: the command 'hello'" in capsys.readouterr().out


def test_a_command_that_fails_to_set_up_its_options_does_not_break_the_others(plugin_path, capsys):
    broken = HELLO.replace('parser.add_argument("--who", default="world")', 'raise ImportError("needs torch")')
    make_dist(plugin_path, "diffcore-broken", "1.0", {"broken": "dc_broken_cmd"},
              {"dc_broken_cmd": broken.replace("{name}", "b").replace("{command}", "broken")})
    hello_plugin(plugin_path, "diffcore-hello")
    assert main(["hello"]) == 0
    capsys.readouterr()
    assert main(["broken"]) == 2
    assert "`diffcore broken` is not available: diffcore-broken could not set up its options: needs torch" in (
        capsys.readouterr().err
    )
