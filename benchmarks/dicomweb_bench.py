"""Patch reading over DICOMweb from a loopback Orthanc against the same slide from file
(issue 18).

The real slide ``CMU-1-Small-Region.svs`` is converted to DICOM WSI with wsidicomizer
(JPEG tiles copied) and stored in an Orthanc started here (the test fixture's
:func:`orthanc_support.start_orthanc`). Each round reads every cell of the slide's grid
(224 px at 0.5 mpp, min_tissue_fraction 0: 140 patches) with :class:`PatchReader`
(2 reader threads, the server's default) from the SVS file, from the PACS, and from the
PACS with the reader's per-batch frame prefetch switched off (one request per patch
read, as wsidicom alone does); the order alternates between rounds and every leg starts
cold (a fresh SlideCache for the file, a freshly opened series over DICOMweb). Printed:
patches per second of each leg, the DICOMweb/file ratio per round, and for DICOMweb the
HTTP requests made, their count per patch and mean time (every request of
dicomweb-client's session, timed around ``requests.Session.request``) and their summed
time over the leg's wall time, so what dominates the gap is measured, not guessed.
Also per round: what StoreDicom's STOW-RS step costs (the converted instances stored
again as 8 new series in one call through :meth:`DicomWebServers.store`, the server's
path after the gRPC stream is parsed: MB/s and instances/s), and the QIDO-RS check a
pooled series pays on each reuse (:meth:`DicomWebServers.check_series`, ms).

Usage: ``.venv/bin/python benchmarks/dicomweb_bench.py [--rounds 5] [--readers 2]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import requests  # noqa: E402
from orthanc_support import convert_to_dicom, start_orthanc, stow  # noqa: E402

from histohelper.server.dicomweb import DicomWebServers, parse_endpoints  # noqa: E402
from histohelper.server.tiling import (  # noqa: E402
    PatchReader,
    SlideCache,
    TilingOptions,
    open_slide,
    plan_tiling,
)
from histohelper.server.tiling.dicom import DicomSlide  # noqa: E402

SLIDE = HERE.parent.parent / "shared" / "slides" / "real" / "CMU-1-Small-Region.svs"
#: Copies of the converted series sent in one STOW-RS call per round.
STOW_COPIES = 8


class RequestClock:
    """Counts and times every ``requests.Session.request`` while installed."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._orig = requests.Session.request

    def __enter__(self) -> RequestClock:
        clock, orig = self, self._orig

        def timed(session: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(session, *args, **kwargs)
            finally:
                with clock._lock:
                    clock.count += 1
                    clock.seconds += time.perf_counter() - t0

        requests.Session.request = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        requests.Session.request = self._orig  # type: ignore[method-assign]


def read_all(slide: Any, grid: Any, readers: int) -> float:
    """Seconds to read every patch of ``grid`` (224 px) from ``slide``, cold: a fresh
    :class:`SlideCache` for a file (the process-wide tile cache would serve repeats),
    a freshly opened series (its own frame cache) for DICOMweb."""
    t0 = time.perf_counter()
    n = 0
    reader = PatchReader(
        slide,
        grid,
        batch_size=32,
        num_workers=readers,
        cache=SlideCache() if isinstance(slide, Path) else None,
    )
    for batch in reader.iter_batches():
        n += len(batch.indices) + len(batch.failed)
    assert n == len(grid)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = convert_to_dicom(SLIDE, work / "dicom")
        (work / "orthanc").mkdir()
        with start_orthanc(work / "orthanc") as pacs:
            stow(pacs, files)
            import pydicom

            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
            with open_slide(SLIDE) as svs:
                # Every cell of the slide (tissue or glass): 130 patches, not 49.
                grid = plan_tiling(svs, TilingOptions(min_tissue_fraction=0.0)).grid
            rows = []
            for r in range(args.rounds):
                servers = DicomWebServers(parse_endpoints(f"pacs={pacs.dicomweb_url}"))
                source = servers.source("pacs", study, series)
                with RequestClock() as opening:
                    source.open().close()  # QIDO + metadata: what an analysis pays once
                order = ["file", "dicomweb", "unbatched"]
                order = order if r % 2 == 0 else order[::-1]
                took: dict[str, float] = {}
                clock, unbatched = RequestClock(), RequestClock()
                for kind in order:
                    if kind == "file":
                        took["file"] = read_all(SLIDE, grid, args.readers)
                    elif kind == "dicomweb":
                        with clock:
                            took["dicomweb"] = read_all(source, grid, args.readers)
                    else:  # one request per patch read: the reader's batch prefetch off
                        fresh = DicomWebServers(parse_endpoints(f"pacs={pacs.dicomweb_url}"))
                        batched = DicomSlide.prefetch_patches
                        DicomSlide.prefetch_patches = lambda *a: None  # type: ignore[method-assign]
                        try:
                            with unbatched:
                                took["unbatched"] = read_all(
                                    fresh.source("pacs", study, series), grid, args.readers
                                )
                        finally:
                            DicomSlide.prefetch_patches = batched  # type: ignore[method-assign]
                            fresh.close()
                datasets = []  # STOW_COPIES new series of the converted instances
                for _ in range(STOW_COPIES):
                    new_series = pydicom.uid.generate_uid()
                    for f in files:
                        ds = pydicom.dcmread(f)
                        ds.SeriesInstanceUID = new_series
                        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
                            pydicom.uid.generate_uid()
                        )
                        datasets.append(ds)
                stow_bytes = STOW_COPIES * sum(Path(f).stat().st_size for f in files)
                t0 = time.perf_counter()
                servers.store("pacs", datasets)
                stow_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(20):
                    servers.check_series("pacs", study, series)
                check_ms = (time.perf_counter() - t0) * 1000 / 20
                servers.close()
                n = len(grid)
                row = {
                    "patches": n,
                    "file_patches_per_s": n / took["file"],
                    "dicomweb_patches_per_s": n / took["dicomweb"],
                    "ratio_dicomweb_over_file": took["file"] / took["dicomweb"],
                    "frame_requests": clock.count,
                    "requests_per_patch": clock.count / n,
                    "ms_per_request": 1000 * clock.seconds / max(clock.count, 1),
                    "request_s_over_wall_s": clock.seconds / took["dicomweb"],
                    "unbatched_patches_per_s": n / took["unbatched"],
                    "unbatched_requests": unbatched.count,
                    "unbatched_ms_per_request": 1000 * unbatched.seconds / max(unbatched.count, 1),
                    "unbatched_request_s_over_wall_s": unbatched.seconds / took["unbatched"],
                    "open_requests": opening.count,
                    "open_s": opening.seconds,
                    "stow_instances": len(datasets),
                    "stow_mb": stow_bytes / 1e6,
                    "stow_s": stow_s,
                    "stow_mb_per_s": stow_bytes / 1e6 / stow_s,
                    "reuse_check_ms": check_ms,
                }
                rows.append(row)
                print(
                    f"round {r + 1}: {n} patches  file {row['file_patches_per_s']:.0f}/s  "
                    f"dicomweb {row['dicomweb_patches_per_s']:.0f}/s  "
                    f"ratio {row['ratio_dicomweb_over_file']:.3f}  "
                    f"{clock.count} requests ({row['requests_per_patch']:.2f}/patch, "
                    f"{row['ms_per_request']:.2f} ms each, in-flight sum "
                    f"{row['request_s_over_wall_s']:.2f}x wall)  "
                    f"open: {opening.count} requests {opening.seconds * 1000:.0f} ms\n"
                    f"    unbatched (one request per patch read): "
                    f"{row['unbatched_patches_per_s']:.0f}/s, {unbatched.count} requests, "
                    f"{row['unbatched_ms_per_request']:.2f} ms each, in-flight sum "
                    f"{row['unbatched_request_s_over_wall_s']:.2f}x wall\n"
                    f"    STOW-RS: {len(datasets)} instances, {row['stow_mb']:.1f} MB in "
                    f"{stow_s:.2f} s = {row['stow_mb_per_s']:.1f} MB/s, "
                    f"{len(datasets) / stow_s:.1f} instances/s; pooled-reuse QIDO check "
                    f"{check_ms:.1f} ms",
                    flush=True,
                )
    ratios = [row["ratio_dicomweb_over_file"] for row in rows]
    print(f"median dicomweb/file patches/s ratio: {statistics.median(ratios):.3f}")
    gains = [row["dicomweb_patches_per_s"] / row["unbatched_patches_per_s"] for row in rows]
    print(f"median batched/unbatched dicomweb patches/s: {statistics.median(gains):.2f}")
    stow_mbs = statistics.median(row["stow_mb_per_s"] for row in rows)
    check = statistics.median(row["reuse_check_ms"] for row in rows)
    print(f"median STOW-RS MB/s: {stow_mbs:.1f}; median pooled-reuse QIDO check: {check:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
