"""`diffcore report` and `diffcore run --report`: the page's content, its offline rendering in headless
Chromium (Debian's package: the chart and the images drawn, no console errors), serving on localhost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, PngImagePlugin

from diffcore.report import write_report
from diffcore.report.page import LOSS_SMOOTH
from diffcore.training.manifest import write_manifest
from tests.jobs import tiny_job, write_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
GREEN = (0, 255, 0)  # the samples' colour, used nowhere else on the page


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diffcore.cli", *args], capture_output=True, text=True)


def fake_run(root: Path) -> Path:
    """An output directory as a run leaves it: metrics (step 3 logged twice, as a resume did before
    the fix), job.yaml, two sample folders with text chunks, an intact and a damaged checkpoint."""
    out = root / "run"
    out.mkdir()
    (out / "job.yaml").write_text(yaml.safe_dump({"name": "shapes", "train": {"steps": 40}, "model": {"type": "dit"}}))
    rows = [{"step": s, "loss": 1.0 / s + 0.05 * (s % 3), "lr": 1e-3 * min(1, s / 10), "samples_per_sec": 100.0 + s, "elapsed_s": s * 0.5} for s in range(1, 41)]
    rows.insert(3, {"step": 3, "loss": 99.0, "lr": 1e-3, "samples_per_sec": 1.0, "elapsed_s": 1.0})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "lo')
    for step in (20, 40):
        folder = out / "samples" / f"step-{step}"
        folder.mkdir(parents=True)
        for i, prompt in enumerate(["a red <circle>", "a green square"]):
            info = PngImagePlugin.PngInfo()
            info.add_text("prompt", prompt)
            info.add_text("seed", str(i))
            info.add_text("sampler", "euler")
            Image.new("RGB", (32, 32), GREEN).save(folder / f"sample-{i:03d}.png", pnginfo=info)
        Image.new("RGB", (64, 32), (1, 2, 3)).save(folder / "grid.png")
    for step in (20, 40):
        ckpt = out / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"x" * 1000)
        (ckpt / "trainer.json").write_text(json.dumps({"step": step, "versions": {"diffcore": "9.9.9", "diffcore-dit": f"0.{step}"}}))
        write_manifest(ckpt)
    (out / "checkpoints" / "step-40" / "model.safetensors").write_bytes(b"y" * 1000)  # changed after writing
    (out / "quality.json").write_text(json.dumps({"class_agreement": 0.75, "per_class": {"red circle": 0.5}}))
    return out


def test_the_page_shows_curves_samples_job_plugins_and_checkpoints(tmp_path):
    out = fake_run(tmp_path)
    page = write_report(out).read_text()
    assert (out / "report.html").is_file() and not list(out.glob(".report.html.*"))
    # curves: one point per step (the resumed step's stale row is replaced, the half line ignored)
    loss_line = page.split(f'stroke="{LOSS_SMOOTH}"')[0].rsplit("<polyline", 1)[1]
    assert loss_line.count(",") == 40
    assert page.count("<svg") == 3 and "smoothed" in page and "samples/s" in page
    # samples: newest first, relative links, text chunks escaped, the grid left out beside single images
    assert page.index("<h3>step 40</h3>") < page.index("<h3>step 20</h3>")
    assert 'src="samples/step-20/sample-001.png"' in page and "grid.png" not in page
    assert "<b>prompt</b> a red &lt;circle&gt;" in page and "<b>seed</b> 1" in page
    # nothing fetched from the network: the page works offline
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    # versions from the newest checkpoint, checkpoints with their state
    assert "checkpoints/step-40/trainer.json" in page and "<td>diffcore-dit</td><td>0.40</td>" in page
    assert 'class="ok">intact' in page
    assert 'class="bad">damaged: model.safetensors: contents changed since written' in page
    assert "step 40 of 40" in page and "name: shapes" in page
    assert "<td>class agreement</td><td>0.750</td>" in page and "red circle 0.50" in page


def test_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path):
    (tmp_path / "photos").mkdir()
    out = run_cli("report", str(tmp_path / "photos"))
    assert out.returncode == 2
    assert out.stderr == (
        f"diffcore: error: {tmp_path / 'photos'}: not a diffcore run: no job.yaml, metrics.jsonl or checkpoints/ in it "
        "(pass the output_dir of a job that has started)\n"
    )
    assert not (tmp_path / "photos" / "report.html").exists()


def test_serve_binds_localhost_and_rewrites_the_page(tmp_path, monkeypatch):
    from diffcore.report import serve

    out = fake_run(tmp_path)
    write_report(out)
    server = serve.make_server(out, 0)
    monkeypatch.setattr(serve, "FRESH_S", 0.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with (out / "metrics.jsonl").open("a") as f:
            f.write('\n{"step": 77, "loss": 0.5}\n')
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
        assert "step 77 of 40" in page  # rewritten for this visit
        image = urllib.request.urlopen(f"http://127.0.0.1:{port}/samples/step-20/sample-000.png").read()
        assert image[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.shutdown()
        server.server_close()


def chromium(url: str, *flags: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *flags, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium; the nox tests session does it as root)")
def test_the_page_renders_offline_in_headless_chromium(tmp_path):
    out = fake_run(tmp_path)
    page = write_report(out)
    # the console check can see an error: a page that makes one shows it in the same log
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('control-error')</script></body></html>")
    control = chromium(bad.as_uri(), "--dump-dom", profile=tmp_path / "profile")
    assert any("control-error" in line for line in console_lines(control.stderr)), control.stderr[-2000:]

    shot = tmp_path / "shot.png"
    run = chromium(page.as_uri(), f"--screenshot={shot}", "--window-size=1200,1400", "--virtual-time-budget=5000", profile=tmp_path / "profile")
    assert shot.is_file(), run.stderr[-2000:]
    assert console_lines(run.stderr) == []
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert pixels.std() > 20  # not a blank page
    # the chart drew its smoothed loss line, and the sample images (pure green) were decoded and drawn
    red = np.array([int(LOSS_SMOOTH[i : i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - red).sum(-1) < 40).sum() > 200
    assert (np.abs(pixels - np.array(GREEN)).sum(-1) < 10).sum() > 4 * 100 * 100
    dom = chromium(page.as_uri(), "--dump-dom", "--virtual-time-budget=5000", profile=tmp_path / "profile")
    assert dom.stdout.count("<img") == 4 and 'class="missing"' not in dom.stdout
    assert console_lines(dom.stderr) == []


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_a_missing_image_says_so_in_the_page(tmp_path):
    out = fake_run(tmp_path)
    page = write_report(out)
    (out / "samples" / "step-20" / "sample-001.png").unlink()
    dom = chromium(page.as_uri(), "--dump-dom", "--virtual-time-budget=5000", profile=tmp_path / "profile")
    assert '<div class="missing">image not found: samples/step-20/sample-001.png</div>' in dom.stdout
    assert dom.stdout.count("<img") == 3


def test_run_report_keeps_the_page_current(tmp_path):
    job = tiny_job(tmp_path / "out")
    job["callbacks"].append({"type": "sample", "every": 2, "labels": [0, 1], "steps": 2, "height": 8, "width": 8})
    out = run_cli("run", str(write_job(tmp_path / "job.yaml", job)), "--report")
    assert out.returncode == 0, out.stderr[-2000:]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "step 4 of 4" in page
    assert "<h3>step 4</h3>" in page and "<h3>step 2</h3>" in page
    assert page.count('class="ok">intact') == 2  # checkpoints step-2 and step-4
    saved = yaml.safe_load((tmp_path / "out" / "job.yaml").read_text())
    assert {"type": "report", "every_s": 30.0} in saved["callbacks"]


def test_a_long_run_keeps_the_page_small(tmp_path, monkeypatch):
    from diffcore.report import collect, page

    out = fake_run(tmp_path)
    rows = [{"step": s, "loss": 1.0 + (s % 7) / 10, "lr": 1e-4, "samples_per_sec": 10.0} for s in range(1, 5001)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(collect, "FOLDERS_SHOWN", 1)
    text = write_report(out).read_text()
    loss_line = text.split(f'stroke="{LOSS_SMOOTH}"')[0].rsplit("<polyline", 1)[1]
    assert loss_line.count(",") == page.MAX_POINTS
    assert "<h3>step 40</h3>" in text and "<h3>step 20</h3>" not in text
    assert "and 1 older sample folders in samples/" in text
