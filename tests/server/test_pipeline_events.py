"""Analyzer event order, free of gRPC: Started comes first, also before an error."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import synthetic_slides as ss

from histohelper.errors import AnalysisCancelledError, CorruptSlideError
from histohelper.server.pipeline import (
    AnalysisSpec,
    Analyzer,
    Completed,
    PatchesDone,
    Progress,
    Started,
)
from histohelper.server.tiling import TilingOptions, open_slide
from histohelper.server.worker import ModelWorker


@pytest.fixture(scope="module")
def worker(served_runtime):
    w = ModelWorker(served_runtime)
    yield w
    w.close()


def _spec(path: Path, **tiling: object) -> AnalysisSpec:
    return AnalysisSpec("req-1", path, TilingOptions(**tiling), batch_size=16)  # type: ignore[arg-type]


def test_started_first_then_batches_then_completed(worker, real_slide: Path) -> None:
    events = list(Analyzer(worker).run(_spec(real_slide), threading.Event()))
    assert isinstance(events[0], Started) and isinstance(events[-1], Completed)
    assert sum(isinstance(e, Started) for e in events) == 1
    done = [e for e in events if isinstance(e, PatchesDone)]
    assert sum(len(e.indices) for e in done) == len(events[0].plan.grid) > 0
    assert all(isinstance(e, PatchesDone | Progress) for e in events[1:-1])


def test_started_precedes_a_reading_error(worker, tmp_path: Path) -> None:
    """A slide whose first batch already fails: Started is still the first event."""
    img = ss.slide_with_tissue(1024, 2048, [(0, 0, 2048, 1024)], seed=13)
    path = ss.write_pyramid(tmp_path / "corrupt.tiff", [img], mpp=0.5, compression="jpeg")
    path = ss.corrupt_tile(path, 0, 0)
    analyzer = Analyzer(worker, max_failed_fraction=0.0)
    events: list[object] = []
    with pytest.raises(CorruptSlideError):
        for ev in analyzer.run(_spec(path, min_tissue_fraction=0.0), threading.Event()):
            events.append(ev)
    assert events and isinstance(events[0], Started)
    assert sum(isinstance(e, Started) for e in events) == 1


def test_large_patches_are_read_at_the_model_size(worker, real_slide: Path) -> None:
    """patch_size_px 4096 with a 224 px model: the one patch is resized once, from the
    read straight to 224 px (a 4096 px intermediate was 48 MiB per patch and a
    different INTER_AREA result)."""
    spec = _spec(real_slide, patch_size_px=4096, min_tissue_fraction=0.0)
    events = list(Analyzer(worker).run(spec, threading.Event()))
    grid = events[0].plan.grid
    done = [e for e in events if isinstance(e, PatchesDone)]
    assert len(grid) == 1 and [len(e.indices) for e in done] == [1]
    model_px = worker.runtime.manifest.patch_size_px
    with open_slide(real_slide) as slide:
        read = slide.read_level_rgb(0, 0.0, 0.0, grid.read_width_px, grid.read_height_px)
    direct = cv2.resize(read, (model_px, model_px), interpolation=cv2.INTER_AREA)
    via_full = cv2.resize(
        cv2.resize(read, (4096, 4096), interpolation=cv2.INTER_AREA),
        (model_px, model_px),
        interpolation=cv2.INTER_AREA,
    )
    assert (direct != via_full).any()  # the two routes are told apart
    want = worker.predict_patches(direct[None]).result().probabilities
    np.testing.assert_array_equal(done[0].probabilities, want)


def test_stop_during_tiling_ends_the_run_without_events(worker, real_slide: Path) -> None:
    """A call cancelled (or past its deadline) while its tissue mask is read yields
    nothing more and frees its caller: the servicer then reports CANCELLED or
    DEADLINE_EXCEEDED."""
    stop = threading.Event()
    stop.set()
    with pytest.raises(AnalysisCancelledError):
        Analyzer(worker).plan(_spec(real_slide), stop)
    assert list(Analyzer(worker).run(_spec(real_slide), stop)) == []
