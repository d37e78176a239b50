"""Cohort run outputs (tester B findings 6, 8, 9, 12): DICOMweb UIDs stay out of
index.html and stderr; a symlink in a folder fails only its slide and a link inside the
root keeps the path the user gave; outputs honour the umask; SIGINT/SIGTERM write
cohort.csv and index.html for the slides done so far (exit 130/143). A real in-process
server on a slide root of small synthetic slides; the signal tests run the CLI in a
subprocess."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cohort_support import write_small_slide
from server_fixtures import inprocess_server

from histohelper.client.cli import main
from histohelper.client.cohort_runner import MANIFEST_NAME, TABLE_NAME

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.222"


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cohort-outputs")
    root = base / "root"
    (root / "c").mkdir(parents=True)
    (root / "other").mkdir()
    write_small_slide(root / "c" / "a.tiff", seed=60)
    write_small_slide(root / "other" / "b.tiff", seed=61)
    write_small_slide(base / "outside.tiff", seed=62)
    (root / "c" / "link_in.tiff").symlink_to(root / "other" / "b.tiff")
    (root / "c" / "link_out.tiff").symlink_to(base / "outside.tiff")
    (root / "many").mkdir()
    for i in range(4):
        write_small_slide(root / "many" / f"s{i}.tiff", seed=70 + i)
    return root


@pytest.fixture(scope="module")
def server(model_artifact: Path, served_runtime, slide_root: Path):
    running = inprocess_server(model_artifact, served_runtime, slide_root)
    yield running
    running.stop(grace=0, drain=0)


def rows(out: Path) -> list[dict[str, str]]:
    with (out / TABLE_NAME).open(newline="") as fh:
        return list(csv.DictReader(fh))


def analyze(slides: list[str], slide_root: Path, server, out: Path) -> int:
    """Run ``histohelper analyze SLIDES`` once (one attempt per slide) and return its exit code."""
    argv = ["analyze", *slides, "--slide-root", str(slide_root), "--server", server.target]
    return main([*argv, "--out", str(out), "--quiet", "--retries", "1"])


def test_symlink_fails_alone_and_inside_link_keeps_its_path(
    server, slide_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = analyze(["c"], slide_root, server, out)
    err = capsys.readouterr().err
    assert code == 1, err
    got = {r["slide"]: (r["status"], r["error"].partition(":")[0]) for r in rows(out)}
    assert got == {
        "c/a.tiff": ("done", ""),
        "c/link_in.tiff": ("done", ""),
        "c/link_out.tiff": ("failed", "SLIDE_PATH_DENIED"),
    }


def test_uids_stay_out_of_index_and_stderr(
    server, slide_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    uri = f"dicomweb://pacs/{STUDY}/{SERIES}"  # the server has no PACS: the slide fails
    code = analyze(["c/a.tiff", uri], slide_root, server, out)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "failed" in err and "pacs-" in err
    html = (out / "index.html").read_text()
    for uid in (STUDY, SERIES):
        assert uid not in err and uid not in html
    assert [r["status"] for r in rows(out)] == ["done", "failed"]


def test_outputs_honour_the_umask(server, slide_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = os.umask(0o002)
    try:
        code = main(
            [
                "analyze",
                "c/a.tiff",
                "other/b.tiff",
                "--slide-root",
                str(slide_root),
                "--server",
                server.target,
                "--out",
                str(out),
                "--quiet",
            ]
        )
    finally:
        os.umask(old)
    assert code == 0

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(out / "a") == mode(out / "b") == 0o775
    assert mode(out / TABLE_NAME) == mode(out / MANIFEST_NAME) == 0o664
    assert mode(out / "index.html") == mode(out / "a" / "report.html") == 0o664


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_table_and_index_for_slides_done(
    server, slide_root: Path, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    out = tmp_path / "out"
    # A process started in the background by a shell without job control (as CI may run
    # the suite) inherits SIGINT ignored, and Python then leaves it ignored: the CLI is
    # started with Python's own SIGINT handler, as from an interactive terminal.
    start = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'histohelper'; runpy.run_module('histohelper.cli', run_name='__main__')"
    )
    argv = [sys.executable, "-c", start, "analyze", "many", "--slide-root"]
    argv += [str(slide_root), "--server", server.target, "--out", str(out), "--quiet"]
    proc = subprocess.Popen([*argv, "--jobs", "1"], stderr=subprocess.PIPE, text=True)
    try:
        manifest = out / MANIFEST_NAME
        while not (manifest.exists() and '"status": "done"' in manifest.read_text()):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "stopped" in err and "finished so far" in err
    done = rows(out)
    assert 1 <= len(done) < 4 and all(r["status"] == "done" for r in done)
    # every slide the manifest marks done is listed, even one stopped while it was written
    marked = json.loads((out / MANIFEST_NAME).read_text())["slides"]
    assert sorted(k for k, v in marked.items() if v["status"] == "done") == sorted(
        r["id"] for r in done
    )
    assert (out / "index.html").read_text().count('/report.html">report</a>') == len(done)
