"""The command line: fast paths import nothing heavy, user errors exit 2 with one message."""

import subprocess
import sys

from tests.jobs import tiny_job, write_job

HEAVY = ("torch", "deepspeed", "transformers")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffcore.cli", *args], capture_output=True, text=True)


def test_help_and_plugins_do_not_import_torch():
    code = (
        "import sys\n"
        "from diffcore.cli import main\n"
        "for argv in (['plugins'], ['plugins', '--json']):\n"
        "    main(argv)\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout[-500:]


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("diffcore ")


def test_missing_job_file_exits_2_without_traceback(tmp_path):
    out = run_cli("run", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr == f"diffcore: error: {tmp_path / 'nope.yaml'}: job file not found (check the path)\n"


def test_bad_set_exits_2(tmp_path):
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "out"))
    out = run_cli("run", str(job), "--set", "train.steps")
    assert out.returncode == 2
    assert "bad --set 'train.steps'" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_dataset_folder_exits_2(tmp_path):
    job = tiny_job(tmp_path / "out")
    job["data"] = {"type": "folder", "path": str(tmp_path / "missing"), "resolution": 64}
    out = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert out.returncode == 2, out.stderr[-1500:]
    assert out.stderr.startswith("diffcore: error: ")
    assert "missing" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
