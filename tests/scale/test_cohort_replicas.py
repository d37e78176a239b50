"""Acceptance of the scale-out issue: a cohort over three replicas that lose two members.

Three real ``histohelper serve`` processes on loopback ports share one slide root; the
cohort runner (``histohelper analyze`` with many slides, ``--server`` a list, so the SDK
uses ``round_robin``) analyses a generated 30-slide cohort. Mid-run one replica is
SIGKILLed (its streams die with UNAVAILABLE; the runner retries those slides elsewhere)
and another SIGTERMed (it drains: calls in flight finish, new ones are refused and go
to the survivor). The cohort must complete with every slide exactly once in the cohort
table and outputs equal to a single-server run, probabilities bit-identical (all three
servers serve the same artifact in fp32). A re-run then does no analysis; a changed
option re-runs every slide it affects.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_fixtures import ServerProcess, spawn_server, stop_server
from synthetic_slides import slide_with_tissue, write_slide

pytestmark = pytest.mark.slow

N_SLIDES = 30
RUN_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """30 small synthetic slides (about 4 to 12 tissue patches each) in one slide root."""
    root = tmp_path_factory.mktemp("cohort-slides")
    names = []
    for i in range(N_SLIDES):
        rng = np.random.default_rng(1000 + i)
        w, h = int(rng.integers(600, 1000)), int(rng.integers(600, 1000))
        bw, bh = int(rng.integers(300, w - 100)), int(rng.integers(300, h - 100))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        img = slide_with_tissue(h, w, [(x, y, bw, bh)], seed=i)
        name = f"case-{i:02d}.tiff"
        write_slide(root / name, img, [(w // 4, h // 4)])
        names.append(name)
    return root, names


@pytest.fixture(scope="module")
def replicas(
    model_artifact: Path, cohort: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    root, _ = cohort
    servers = []
    try:
        for k in range(3):
            work = tmp_path_factory.mktemp(f"replica{k}")
            servers.append(
                spawn_server(
                    model_artifact,
                    root,
                    work,
                    "--audit-log",
                    str(work / "audit.jsonl"),
                    "--drain-s",
                    "60",
                )
            )
        yield servers
    finally:
        for s in servers:
            stop_server(s)


def analyzed_calls(server: ServerProcess) -> list[dict[str, object]]:
    """The AnalyzeSlide records of a server's audit log."""
    log = server.log_path.parent / "audit.jsonl"
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("rpc") == "AnalyzeSlide"]


def run_cohort(
    slides: list[str], servers: list[ServerProcess], out: Path, *extra: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "histohelper.cli", "analyze", *slides,
        "--server", ",".join(s.target for s in servers),
        "--jobs", "3", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip
    log = (out.parent / f"{out.name}.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen[bytes], out: Path) -> int:
    try:
        return proc.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"cohort run did not finish:\n{(out.parent / f'{out.name}.log').read_text()}")


def done_folders(out: Path) -> int:
    return sum(1 for p in out.glob("*/summary.json")) if out.exists() else 0


def table(out: Path) -> list[dict[str, str]]:
    with (out / "cohort.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def probabilities(out: Path, slide_id: str) -> np.ndarray:
    with np.load(out / slide_id / "heatmap.npz") as z:
        return z["probabilities"].copy()


def test_cohort_survives_a_killed_and_a_drained_replica(
    replicas: list[ServerProcess], cohort: tuple[Path, list[str]], tmp_path: Path
) -> None:
    _, slides = cohort
    killed, drained, survivor = replicas

    # Reference: the survivor alone, before anything is killed.
    ref_out = tmp_path / "single"
    assert wait(run_cohort(slides, [survivor], ref_out), ref_out) == 0
    calls_before = {id(s): len(analyzed_calls(s)) for s in replicas}

    out = tmp_path / "replicas"
    proc = run_cohort(slides, replicas, out)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    sent_kill = sent_term = False
    while proc.poll() is None and time.monotonic() < deadline:
        n = done_folders(out)
        if not sent_kill and n >= 6:
            killed.process.send_signal(signal.SIGKILL)
            sent_kill = True
        if not sent_term and n >= 12:
            drained.process.send_signal(signal.SIGTERM)
            sent_term = True
        time.sleep(0.05)
    rc = wait(proc, out)
    log = (tmp_path / "replicas.log").read_text()
    assert sent_kill and sent_term, f"the cohort ended before both replicas were stopped:\n{log}"
    assert rc == 0, log
    assert killed.process.wait(30) == -signal.SIGKILL
    assert drained.process.wait(90) == 0, drained.log_text()

    rows = table(out)
    ref_rows = table(ref_out)
    assert sorted(r["slide"] for r in rows) == sorted(slides)  # each slide exactly once
    assert all(r["status"] == "done" for r in rows), rows
    # Each of the three replicas did part of the work before the stops.
    for s in replicas:
        assert len(analyzed_calls(s)) > calls_before[id(s)] or s is killed
    ids = {r["slide"]: r["id"] for r in rows}
    ref_ids = {r["slide"]: r["id"] for r in ref_rows}
    for slide in slides:
        np.testing.assert_array_equal(
            probabilities(out, ids[slide]), probabilities(ref_out, ref_ids[slide]), strict=True
        )
        for name in ("summary.json", "patches.csv", "tiles.geojson"):
            assert (out / ids[slide] / name).is_file()

    # A re-run of the finished cohort does no analysis: the survivor sees no call.
    before = len(analyzed_calls(survivor))
    assert wait(run_cohort(slides, [survivor], out), out) == 0
    assert len(analyzed_calls(survivor)) == before
    assert {r["status"] for r in table(out)} == {"skipped"}

    # A changed option re-runs exactly the slides it affects: all of them here.
    assert wait(run_cohort(slides, [survivor], out, "--min-tissue", "0.3"), out) == 0
    assert len(analyzed_calls(survivor)) == before + N_SLIDES
    assert {r["status"] for r in table(out)} == {"done"}
    assert os.listdir(out)  # nothing left half-written under a temporary name
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
