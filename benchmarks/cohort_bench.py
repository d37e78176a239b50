"""Benchmark (not a test): a cohort of many small biopsies against one large slide.

Per-slide overhead (the request, tiling, start-up of the stream, the MIL head, the
client's assembly) must hide behind compute when a cohort keeps several slides in
flight. This measures, against one real ``histohelper serve`` process with its
defaults (the same server for both sides), alternated ``--rounds`` times:

- ``large``: one AnalyzeSlide of the 10,000 px bench mosaic (``slides.py``) through
  the SDK, request to result: patches/s;
- ``cohort``: ``SlideClient.analyze_many`` over ``--biopsies`` small mosaics of real
  tissue (side 1,400..3,000 px at 0.5 um/px, about 20..100 tissue patches each),
  ``jobs`` = the server's ``max_concurrent_analyses``: patches/s and slides/h over the
  whole cohort (first request to last result).

Prints each round and the median of the per-round ratios cohort/large (the issue's
target: patches/s >= 0.9 of the large slide's). Slides and the artifact are cached like
``run.py``'s (``~/.cache/histohelper-bench`` or ``$HISTOHELPER_BENCH_CACHE``).

Usage: ``.venv/bin/python benchmarks/cohort_bench.py [--biopsies 60 --rounds 2
--model ARTIFACT --json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import slides  # noqa: E402
from ab_throughput import report  # noqa: E402
from run import SOURCE_SLIDE, Server, ensure_artifact  # noqa: E402

COHORT_DIR = "cohort-v1"
LARGE_PX = 10_000


def biopsy_slides(n: int) -> list[str]:
    """``n`` small mosaics under the cache's ``cohort-v1/`` (written once); their paths
    relative to the cache directory (the server's slide root)."""
    root = slides.cache_dir() / COHORT_DIR
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    names = []
    for i in range(n):
        size = int(rng.integers(1400, 3001))
        path = root / f"biopsy-{i:03d}-{size}px.tiff"
        if not path.exists():
            slides.write_slide(path, slides.mosaic(size, SOURCE_SLIDE, seed=100 + i))
        names.append(f"{COHORT_DIR}/{path.name}")
    return names


def run_large(target: str, slide: str) -> dict[str, float]:
    from histohelper.client import SlideClient

    with SlideClient(target) as client:
        t0 = time.perf_counter()
        result = client.analyze(slide)
        wall = time.perf_counter() - t0
    return {
        "patches": result.patch_count,
        "wall_s": wall,
        "patches_per_s": result.patch_count / wall,
    }


def run_cohort(target: str, names: list[str]) -> dict[str, float]:
    from histohelper.client import SlideClient

    with SlideClient(target) as client:
        jobs = client.get_model_info().max_concurrent_analyses
        t0 = time.perf_counter()
        outcomes = list(client.analyze_many(names, jobs=jobs))
        wall = time.perf_counter() - t0
    failed = [o.reason for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} biopsies failed: {failed[:3]}")
    patches = sum(o.result.patch_count for o in outcomes if o.result is not None)
    return {
        "slides": len(outcomes),
        "patches": patches,
        "jobs": jobs,
        "wall_s": wall,
        "patches_per_s": patches / wall,
        "slides_per_h": len(outcomes) / wall * 3600,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--biopsies", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", type=Path, help="artifact (default: run.py's cached export)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument(
        "--mask-min-um-per-px",
        type=float,
        default=0.0,
        help="the server's --mask-min-um-per-px (0: its default)",
    )
    args = ap.parse_args()
    cache = slides.cache_dir()
    artifact = args.model or ensure_artifact(cache)
    large = slides.ensure_slide(LARGE_PX, SOURCE_SLIDE).relative_to(cache)
    names = biopsy_slides(args.biopsies)
    figures: dict[str, Any] = {
        "load_avg_start": os.getloadavg(),
        "mask_min_um_per_px": args.mask_min_um_per_px,
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        extra = ("--mask-min-um-per-px", str(args.mask_min_um_per_px))
        server = Server(artifact, cache, Path(tmp), *extra)
        try:
            run_large(server.target, str(large))  # warm-up: page cache, model
            for _ in range(args.rounds):
                a = run_large(server.target, str(large))
                b = run_cohort(server.target, names)
                figures["rounds"].append({"large": a, "cohort": b})
        finally:
            server.stop()
    figures["load_avg_end"] = os.getloadavg()
    ratios = [r["cohort"]["patches_per_s"] / r["large"]["patches_per_s"] for r in figures["rounds"]]
    figures["median_ratio"] = round(statistics.median(ratios), 3)
    lines = [f"{'round':>5}  {'large p/s':>9}  {'cohort p/s':>10}  {'slides/h':>8}  {'ratio':>6}"]
    for i, (r, q) in enumerate(zip(figures["rounds"], ratios, strict=True)):
        c = r["cohort"]
        lines.append(
            f"{i + 1:>5}  {r['large']['patches_per_s']:>9.2f}  {c['patches_per_s']:>10.2f}  "
            f"{c['slides_per_h']:>8.0f}  {q:>6.3f}"
        )
    c0 = figures["rounds"][0]["cohort"]
    lines.append(
        f"cohort: {c0['slides']} biopsies, {c0['patches']} patches, jobs {c0['jobs']}; large: "
        f"{figures['rounds'][0]['large']['patches']} patches; median cohort/large "
        f"{figures['median_ratio']:.3f} (target >= 0.9); "
        f"--mask-min-um-per-px {args.mask_min_um_per_px:g}"
    )
    return report(figures, lines, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
