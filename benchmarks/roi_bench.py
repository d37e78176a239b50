"""Cost of a region of interest (issue 21), measured side by side in one run.

For smooth QuPath-like outlines (a wobbly circle with a hole) of 1,000 to 100,000
vertices over a 100,000 x 80,000 px slide:

* ``parse``: :func:`histohelper.server.tiling.roi.parse_region` on the GeoJSON text
  (JSON, vertex count, Shapely validity, union, digest);
* ``raster``: :func:`~histohelper.server.tiling.roi.scan_convert` of the include polygon
  on a 1,024 px and a 4,096 px mask (the centre rule, exact), against OpenCV's
  ``cv2.fillPoly`` (fixed point, 8 fractional bits) on the same grid, and how many pixels
  ``fillPoly`` puts on the other side of the centre rule;
* ``grid``: :func:`~histohelper.server.tiling.plan.build_region_grid` against
  :func:`~histohelper.server.tiling.plan.build_grid` on a synthetic 1,024 px tissue mask
  (224 px patches at 0.5 um/px on a 0.25 um/px slide: 892 x 714 cells).

Run: ``.venv/bin/python benchmarks/roi_bench.py [--repeat 3]``; prints a table
(medians of ``--repeat`` runs, seconds) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import shapely

from histohelper.server.tiling import TilingOptions
from histohelper.server.tiling.mask import TissueMask
from histohelper.server.tiling.plan import build_grid, build_region_grid
from histohelper.server.tiling.roi import RegionLimits, parse_region, scan_convert
from histohelper.server.tiling.slide import SlideMetadata

W_L0, H_L0 = 100_000, 80_000


def outline(n: int, radius: float, seed: int) -> list[list[float]]:
    """A closed, smooth, wobbly circle of ``n`` vertices (level-0 px), counter-clockwise."""
    rng = np.random.default_rng(seed)
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wobble = 1 + 0.08 * np.sin(7 * a + rng.uniform(0, 6)) + 0.03 * np.sin(31 * a)
    ring = np.c_[
        W_L0 / 2 + radius * wobble * np.cos(a), H_L0 / 2 + 0.8 * radius * wobble * np.sin(a)
    ]
    return [*ring.tolist(), ring[0].tolist()]


def median_s(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}")
    rows = []
    for n in (1_000, 10_000, 100_000):
        shell = outline(n, 35_000, 0)
        hole = outline(max(16, n // 10), 8_000, 1)[::-1]
        text = json.dumps({"type": "Polygon", "coordinates": [shell, hole]})
        limits = RegionLimits(max_vertices=200_000, max_bytes=64 * 2**20)
        roi = parse_region(text, limits=limits)
        assert roi is not None and roi.include is not None
        t_parse = median_s(lambda: parse_region(text, limits=limits), args.repeat)  # noqa: B023
        row = {"vertices": n + len(hole), "parse_s": t_parse}
        for side in (1024, 4096):
            shape = (round(side * H_L0 / W_L0), side)
            sx, sy = W_L0 / shape[1], H_L0 / shape[0]
            geom = roi.include
            t_scan = median_s(lambda: scan_convert(geom, shape, sx, sy), args.repeat)  # noqa: B023
            pts = [
                np.round((np.asarray(r, np.float64) / (sx, sy) - 0.5) * 256).astype(np.int32)
                for r in (shell, hole)
            ]

            def fill() -> np.ndarray:
                canvas = np.zeros(shape, np.uint8)  # noqa: B023
                cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=8)  # noqa: B023
                return canvas

            t_fill = median_s(fill, args.repeat)
            exact = scan_convert(geom, shape, sx, sy)
            jj, ii = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]))
            assert np.array_equal(
                exact, shapely.contains_xy(geom, (jj + 0.5) * sx, (ii + 0.5) * sy)
            )
            differ = int((fill().astype(bool) != exact).sum())
            row[f"scan_{side}_s"] = t_scan
            row[f"fillpoly_{side}_s"] = t_fill
            row[f"fillpoly_{side}_px_off"] = differ
            row[f"boundary_{side}_px"] = int(
                (exact ^ cv2.erode(exact.astype(np.uint8), np.ones((3, 3))).astype(bool)).sum()
            )
        rows.append(row)
    # The grid step on a synthetic mask: all tissue inside an ellipse.
    shape = (819, 1024)
    sx, sy = W_L0 / 1024, H_L0 / 819
    jj, ii = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]))
    tissue = ((jj - 512) / 480) ** 2 + ((ii - 410) / 380) ** 2 < 1
    mask = TissueMask(tissue, sx, sy, float(tissue.mean()), "synthetic")
    md = SlideMetadata(
        width_l0=W_L0, height_l0=H_L0, level_count=1, level_dimensions=((W_L0, H_L0),),
        level_downsamples=((1.0, 1.0),), openslide_downsamples=(1.0,), mpp_x=0.25, mpp_y=0.25,
        objective_power=40.0, vendor="synthetic",
    )  # fmt: skip
    text = json.dumps({"type": "Polygon", "coordinates": [outline(100_000, 35_000, 0)]})
    roi = parse_region(text, limits=RegionLimits(max_vertices=200_000, max_bytes=64 * 2**20))
    plain, inside = TilingOptions(), TilingOptions(roi=roi)
    t_plain = median_s(lambda: build_grid(md, mask, plain, 2.0, 2.0, 0, 0.5), args.repeat)
    t_roi = median_s(lambda: build_region_grid(md, mask, inside, 2.0, 2.0, 0, 0.5, []), args.repeat)
    grid, _, removed = build_region_grid(md, mask, inside, 2.0, 2.0, 0, 0.5, [])
    print(
        "| vertices | parse+validate s | scan 1,024 s | fillPoly 1,024 s | fillPoly px off / "
        "boundary px | scan 4,096 s | fillPoly 4,096 s | fillPoly px off / boundary px |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [f"{r['vertices']:,}", f"{r['parse_s']:.3f}"]
        for side in (1024, 4096):
            cells += [
                f"{r[f'scan_{side}_s']:.4f}",
                f"{r[f'fillpoly_{side}_s']:.4f}",
                f"{r[f'fillpoly_{side}_px_off']:,} / {r[f'boundary_{side}_px']:,}",
            ]
        print("| " + " | ".join(cells) + " |")
    print(
        f"grid step on a 1,024 px mask, 100,000-vertex region: build_grid {t_plain:.3f} s, "
        f"build_region_grid {t_roi:.3f} s ({t_roi / t_plain:.1f}x); {len(grid):,} patches kept, "
        f"{removed:,} removed by the region"
    )


if __name__ == "__main__":
    main()
