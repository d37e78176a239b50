"""Smoke test of ``benchmarks/starvation.py`` with very small numbers.

Proves the script runs end to end against a real server process (10 half-open calls,
3 non-reading streams, a 2 s stall limit) and prints its table; asserts no timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_starvation_benchmark_runs(model_artifact: Path, slides_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "starvation.json"
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "starvation.py"),
            "--model",
            str(model_artifact),
            "--slide-root",
            str(slides_dir),
            "--half-open",
            "10",
            "--non-reading",
            "3",
            "--stall-s",
            "2",
            "--repeats",
            "3",
            "--pace-s",
            "0",
            "--admission-wait-s",
            "60",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for row in ("health Check", "GetModelInfo", "AnalyzeSlide", "slot free", "STREAM_STALLED"):
        assert row in res.stdout, row
    r = json.loads(out.read_text())
    assert r["half_open"] == 10 and r["non_reading"] == 3
    assert sum(r["non_reading_at_open"].values()) == 3
