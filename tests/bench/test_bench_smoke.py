"""Smoke test of the benchmark harness (``make bench``) in its tiny mode.

Proves every step runs (naive baseline, model-only runtimes, e2e over a real server
process, RSS, roofline) and the result file has its keys; asserts no timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEYS = (
    "naive_patches_per_s",
    "model_patches_per_s",
    "e2e_patches_per_s",
    "first_result_s",
    "peak_rss_mb_small",
    "peak_rss_mb_large",
    "roofline_bf16_gflops",
    "roofline_fp32_gflops",
    "machine",
)


def test_bench_tiny_runs(model_artifact: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            "--tiny",
            "--artifact",
            str(model_artifact),
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "tiny.json").read_text())
    for key in KEYS:
        assert key in r, key
    assert r["e2e"]["patches"] > 0 and r["bench_patches"] > 0
    assert r["model"]["ts-fp32-cl"]["patches_per_s"] > 0
    assert "(c)/(a)" in res.stdout
    # (c)/best (b): each (c) run over the mean of the (b) runs bracketing it
    assert len(r["model_best_runs"]) == len(r["e2e_runs"]) + 1
    pairs = r["ratio_e2e_over_best_model_runs"]
    assert len(pairs) == len(r["e2e_runs"])
    want = r["e2e_runs"][0]["patches_per_s"] * 2 / sum(r["model_best_runs"][:2])
    assert abs(pairs[0] - want) < 1e-3
