"""Benchmark: tissue mask + patch grid of a 100,000 x 100,000 px sparse slide.

Writes a synthetic BigTIFF (0.25 um/px, JPEG tiles, tissue in a few boxes, every
other tile empty) once into a temp dir, then plans its tiling in a fresh child
process per variant and prints seconds and peak RSS:

* ``one-level``: no pyramid, so the mask cannot come from a small level and must be
  sampled in bands (the case where get_thumbnail would decode 10^10 px);
* ``pyramid``: reduced levels at 4/16/64, the mask comes from a small level.

Usage: ``.venv/bin/python benchmarks/tiling_large.py [--keep DIR]``. Not a test:
figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE = 100_000
BOXES = [
    (20_000, 30_000, 12_000, 8_000),
    (60_000, 55_000, 9_000, 15_000),
    (80_000, 5_000, 3_000, 3_000),
]


def _child(path: str) -> None:
    import resource

    from histohelper.server.tiling import PatchReader, TilingOptions, open_slide, plan_tiling

    t0 = time.perf_counter()
    with open_slide(path) as slide:
        plan = plan_tiling(slide, TilingOptions())
    t_plan = time.perf_counter() - t0
    rss_plan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    n = 0
    indices = list(range(min(512, len(plan.grid))))
    for batch in PatchReader(path, plan.grid, batch_size=64, num_workers=2).iter_batches(indices):
        n += len(batch)
    t_read = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "levels": plan.metadata.level_dimensions,
                "mask_shape": list(plan.mask.mask.shape),
                "mask_sampled": plan.mask.sampled,
                "mask_level": plan.mask.level,
                "tissue_fraction": round(plan.mask.tissue_fraction, 5),
                "grid": [plan.grid.n_rows, plan.grid.n_cols],
                "patches": len(plan.grid),
                "plan_seconds": round(t_plan, 2),
                "peak_rss_mib_after_plan": round(rss_plan, 1),
                "read_patches": n,
                "read_patches_per_s": round(n / t_read, 1) if t_read else None,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write the slides here instead of a temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return 0
    sys.path.insert(0, str(HERE.parent / "tests"))
    import synthetic_slides as ss

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        variants = {"one-level": (), "pyramid": (4, 16, 64)}
        for name, downsamples in variants.items():
            path = out / f"sparse-100k-{name}.tiff"
            t0 = time.perf_counter()
            ss.write_sparse_slide(path, SIZE, SIZE, BOXES, mpp=0.25, downsamples=downsamples)
            t_write = time.perf_counter() - t0
            res = subprocess.run(
                [sys.executable, __file__, "--child", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"{name}: wrote {path.stat().st_size / 2**20:.1f} MiB in {t_write:.1f} s")
            print(f"{name}: {res.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
