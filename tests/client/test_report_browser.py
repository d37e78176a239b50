"""report.html and index.html in a real headless Chromium (tests/chromium_cdp.py: the
DevTools protocol over a pipe, no Playwright, no websocket client).

The report comes from a real analysis: ``histohelper analyze`` against the session's
real server on loopback, on real/CMU-1-Small-Region.svs. The page must load with no
console error and no failed or external request, every image must decode, and a
full-page screenshot is written (to the test's tmp dir; also to
``$HISTOHELPER_REPORT_SHOTS`` when set, for a closing note). index.html must sort
when a header is clicked with the mouse.

Skips only where no Chromium binary exists (``.ci/run`` installs Debian's ``chromium``;
``$HISTOHELPER_CHROMIUM`` names another).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from chromium_cdp import Browser, Page, find_chromium

from histohelper.cli import main as cli_main
from histohelper.client.cli import main
from histohelper.client.report import write_cohort_index

SLIDE = "real/CMU-1-Small-Region.svs"
SHOTS_ENV = "HISTOHELPER_REPORT_SHOTS"

pytestmark = pytest.mark.slow

IMAGES_DECODED = """Array.from(document.images).map(i => ({
  alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium binary on this machine (.ci/run installs Debian's chromium)")
    with Browser(binary) as b:
        yield b


@pytest.fixture(scope="module")
def analyze_out(analysis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analyze-report")
    rc = main(["analyze", SLIDE, "--server", analysis_server.target, "--out", str(out), "-q"])
    assert rc == 0
    return out


def keep_shot(shot: Path, name: str) -> None:
    """Copy a screenshot to ``$HISTOHELPER_REPORT_SHOTS`` when set."""
    target = os.environ.get(SHOTS_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(target) / name)


def assert_clean(page: Page) -> None:
    assert page.console_errors() == []
    assert page.failed_requests() == []
    assert page.dialogs() == []


def test_report_of_a_real_analysis_loads_cleanly(
    browser: Browser, analyze_out: Path, tmp_path: Path
) -> None:
    report = analyze_out / "report.html"
    assert report.is_file()
    page = browser.new_page()
    page.goto(report.resolve().as_uri())
    assert_clean(page)
    images = page.evaluate(IMAGES_DECODED)
    assert [i["alt"] for i in images] == [
        "slide thumbnail",
        "tissue mask",
        "probability overlay",
        "attention overlay",
    ]
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    assert page.evaluate("document.title") == f"HistoHelper report: {SLIDE}"
    banner = page.evaluate("document.querySelector('.banner').textContent")
    assert "UNTRAINED" in banner and "patch classifier, MIL slide head" in banner
    shot = page.screenshot(tmp_path / "report.png")
    keep_shot(shot, "report.png")
    png = cv2.imread(str(shot))
    assert png is not None and png.shape[0] > 1000 and png.shape[1] >= 1000
    assert float(np.std(png)) > 20  # not a blank page


def test_cohort_index_sorts_when_a_header_is_clicked(
    browser: Browser, analyze_out: Path, tmp_path: Path
) -> None:
    (tmp_path / "b").mkdir()
    shutil.copyfile(analyze_out / "report.html", tmp_path / "b" / "report.html")
    rows = [
        {"id": "b", "status": "done", "report": "b/report.html", "probability": "0.9"},
        {"id": "c <i>", "status": "done", "report": "", "probability": "10"},
        {"id": "a", "status": "failed", "report": "", "probability": ""},
        {"id": "d", "status": "done", "report": "", "probability": "0.05"},
    ]
    page = browser.new_page()
    page.goto(write_cohort_index(tmp_path, rows).resolve().as_uri())
    assert_clean(page)
    ids = (
        "Array.from(document.querySelectorAll('#cohort tbody tr')).map(r => r.cells[0].textContent)"
    )
    assert page.evaluate(ids) == ["b", "c <i>", "a", "d"]
    page.click("#cohort th:nth-child(4)")  # probability: numeric, empty cells last
    assert page.evaluate(ids) == ["d", "b", "c <i>", "a"]
    assert page.evaluate("document.querySelector('#cohort th:nth-child(4)').ariaSort") == (
        "ascending"
    )
    page.click("#cohort th:nth-child(4)")
    assert page.evaluate(ids) == ["c <i>", "b", "d", "a"]
    page.click("#cohort th:nth-child(1)")  # id: text
    assert page.evaluate(ids) == ["a", "b", "c <i>", "d"]
    keep_shot(page.screenshot(tmp_path / "index.png"), "index.png")
    # The report link opens the slide's report, which loads cleanly too.
    page.follow("#cohort a")
    assert page.evaluate("location.pathname").endswith("/b/report.html")
    assert_clean(page)


def test_explain_report_shows_the_grad_cam_gallery(
    browser: Browser, analysis_server: Any, tmp_path: Path
) -> None:
    out = tmp_path / "explain"
    argv = ["explain", SLIDE, "--server", analysis_server.target, "--out", str(out)]
    assert cli_main([*argv, "--top-k", "3", "--colormap", "viridis", "-q"]) == 0
    page = browser.new_page()
    page.goto((out / "report.html").resolve().as_uri())
    assert_clean(page)
    images = page.evaluate(IMAGES_DECODED)
    alts = [i["alt"] for i in images]
    assert "CAM overlay" in alts and "attention overlay" in alts
    assert len([a for a in alts if a.startswith("Grad-CAM of patch")]) == 3
    assert all(i["complete"] and i["w"] > 0 for i in images), images
    keep_shot(page.screenshot(tmp_path / "explain_report.png"), "explain_report.png")
