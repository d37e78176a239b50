"""Pooled slide handles follow the file, not its name (issue 16, finding 1).

A slide replaced under the same name (``os.replace``) was analysed with the old file's
pixels, because idle reader handles were pooled by path; deleted files stayed open.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as ss

from histohelper.server.pipeline import AnalysisSpec, Analyzer, PatchesDone, Started
from histohelper.server.tiling import SlideCache, TilingOptions
from histohelper.server.worker import ModelWorker


@pytest.fixture(scope="module")
def worker(served_runtime):
    w = ModelWorker(served_runtime)
    yield w
    w.close()


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two slides of one size and layout whose tissue pixels differ."""
    folder = tmp_path_factory.mktemp("identity")
    boxes = [(64, 64, 1400, 700)]
    a = ss.slide_with_tissue(1024, 1536, boxes, seed=3)
    b = ss.slide_with_tissue(1024, 1536, boxes, seed=11)
    return (
        ss.write_pyramid(folder / "a.tiff", [a], mpp=0.5, compression="jpeg"),
        ss.write_pyramid(folder / "b.tiff", [b], mpp=0.5, compression="jpeg"),
    )


def _analyse(analyzer: Analyzer, path: Path) -> tuple[int, dict[int, np.ndarray]]:
    spec = AnalysisSpec("req-identity", path, TilingOptions(min_tissue_fraction=0.0), 16)
    probs: dict[int, np.ndarray] = {}
    n = 0
    for event in analyzer.run(spec, threading.Event()):
        if isinstance(event, Started):
            n = len(event.plan.grid)
        elif isinstance(event, PatchesDone):
            probs.update(zip(event.indices.tolist(), event.probabilities, strict=True))
    return n, probs


def _fds_on(path: Path) -> int:
    """Open file descriptors of this process on ``path`` (deleted or not)."""
    target = str(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link == target or link == f"{target} (deleted)":
            count += 1
    return count


def test_a_replaced_slide_is_read_from_the_new_file(
    worker: ModelWorker, two_slides: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_slides
    served = tmp_path / "slide.tiff"
    served.write_bytes(a.read_bytes())
    cache = SlideCache(max_idle_handles=8)
    analyzer = Analyzer(worker, num_readers=2, slide_cache=cache)
    _analyse(analyzer, served)
    assert cache.idle_count > 0  # the readers' handles on the old file are pooled

    replacement = tmp_path / "incoming.tiff"
    replacement.write_bytes(b.read_bytes())
    os.replace(replacement, served)
    n, got = _analyse(analyzer, served)
    n_fresh, want = _analyse(Analyzer(worker, num_readers=2), b)

    assert n == n_fresh > 0 and sorted(got) == sorted(want) == list(range(n))
    for i in range(n):
        np.testing.assert_array_equal(got[i], want[i])
    assert cache.stale_closed > 0


def test_handles_on_a_deleted_slide_are_closed(
    worker: ModelWorker, two_slides: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_slides
    served = tmp_path / "doomed.tiff"
    served.write_bytes(a.read_bytes())
    cache = SlideCache(max_idle_handles=8)
    analyzer = Analyzer(worker, num_readers=2, slide_cache=cache)
    _analyse(analyzer, served)
    assert _fds_on(served) > 0  # pooled idle handles hold the file open

    served.unlink()
    other = cache.acquire(b)  # any later use of the cache closes stale handles
    cache.release(other)
    assert _fds_on(served) == 0
    assert cache.idle_count == 1  # only the handle on the other slide
