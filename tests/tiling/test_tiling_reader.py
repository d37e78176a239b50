"""PatchReader: exactly-once delivery, stop, early close, corrupt tiles, SlideCache."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from histohelper.errors import CorruptSlideError, InvalidOptionsError
from histohelper.server.tiling import (
    PatchReader,
    SlideCache,
    TilingOptions,
    open_slide,
    plan_tiling,
)
from histohelper.server.tiling.reader import batch_sizes


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("patch-reader")]


@pytest.fixture(scope="module")
def corrupt_plan(corrupt_jpeg_slide: Path):
    with open_slide(corrupt_jpeg_slide) as slide:
        # min_tissue_fraction 0: keep the cells over the corrupt tile (the mask calls
        # them background because they could not be read).
        return plan_tiling(slide, TilingOptions(patch_size_px=64, min_tissue_fraction=0.0))


def test_every_index_exactly_once(corrupt_jpeg_slide: Path, corrupt_plan) -> None:
    grid = corrupt_plan.grid
    assert len(grid) > 300
    wanted = list(range(0, len(grid), 2))
    reader = PatchReader(
        corrupt_jpeg_slide, grid, batch_size=7, num_workers=3, max_failed_fraction=0.5
    )
    got: list[int] = []
    failed: list[int] = []
    for batch in reader.iter_batches(wanted):
        assert batch.images.shape == (len(batch), 64, 64, 3)
        got += batch.indices.tolist()
        failed += batch.failed.tolist()
    assert sorted(got + failed) == wanted
    # The corrupt tile (level-0 x 1280..1536, y 0..256) explains every failure.
    assert failed
    for i in failed:
        assert grid.x_l0[i] + 64 > 1280 and grid.x_l0[i] < 1536 and grid.y_l0[i] < 256
    assert not _reader_threads()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # A small first batch (time to first result), then full ones.
        ({"first_batch_size": 5}, [5] + [32] * 6 + [3]),
        # The last 64 patches in 8s (several model threads finish together).
        (
            {"first_batch_size": 8, "tail_patches": 64, "tail_batch_size": 8},
            [8] + [32] * 4 + [8] * 8,
        ),
    ],
    ids=["small-first", "fine-tail"],
)
def test_batch_plan(corrupt_jpeg_slide: Path, corrupt_plan, kwargs, expected) -> None:
    """Batches come in the planned sizes; every index exactly once."""
    grid = corrupt_plan.grid
    wanted = list(range(0, 200))
    reader = PatchReader(
        corrupt_jpeg_slide, grid, batch_size=32, num_workers=1, max_failed_fraction=1.0, **kwargs
    )
    batches = list(reader.iter_batches(wanted))
    assert [len(b) + len(b.failed) for b in batches] == expected
    got = sorted(i for b in batches for i in b.indices.tolist() + b.failed.tolist())
    assert got == wanted


@pytest.mark.parametrize("bad", [{"first_batch_size": 0}, {"tail_batch_size": 0}])
def test_bad_batch_sizes_raise(corrupt_jpeg_slide: Path, corrupt_plan, bad) -> None:
    with pytest.raises(InvalidOptionsError):
        PatchReader(corrupt_jpeg_slide, corrupt_plan.grid, **bad)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0, 32, 8, 64, 8), []),
        ((5, 32, 8, 64, 8), [5]),
        ((8, 32, 8, 64, 8), [8]),
        ((30, 32, 8, 64, 8), [8, 8, 8, 6]),
        ((200, 32, 5), [5] + [32] * 6 + [3]),
        # 3,001 patches on two model threads: the body remainder (17) joins the tail.
        ((3001, 32, 8, 64, 8), [8] + [32] * 91 + [8] * 10 + [1]),
        ((100, 32, None, 0, None), [32, 32, 32, 4]),
    ],
)
def test_batch_sizes(args: tuple, expected: list[int]) -> None:
    sizes = batch_sizes(*args)
    assert sizes == expected and sum(sizes) == args[0]


def test_too_many_failures_raise(corrupt_jpeg_slide: Path, corrupt_plan) -> None:
    reader = PatchReader(corrupt_jpeg_slide, corrupt_plan.grid, max_failed_fraction=0.0)
    with pytest.raises(CorruptSlideError):
        for _ in reader.iter_batches():
            pass
    assert reader.failed_indices
    assert not _reader_threads()


def test_stop_event_ends_iteration(corrupt_jpeg_slide: Path, corrupt_plan) -> None:
    stop = threading.Event()
    reader = PatchReader(
        corrupt_jpeg_slide, corrupt_plan.grid, batch_size=4, max_failed_fraction=1.0
    )
    n = 0
    for _ in reader.iter_batches(stop=stop):
        n += 1
        stop.set()
    assert n <= 1 + reader.num_workers  # at most what was already queued... and ends
    assert not _reader_threads()


def test_closing_the_generator_joins_threads(corrupt_jpeg_slide: Path, corrupt_plan) -> None:
    reader = PatchReader(
        corrupt_jpeg_slide, corrupt_plan.grid, batch_size=4, queue_depth=1, max_failed_fraction=1.0
    )
    it = reader.iter_batches()
    next(it)
    it.close()
    assert not _reader_threads()


def test_slide_cache_bounds_idle_handles(
    odd_pyramid: Path, rgba_slide: Path, glass_slide: Path, pen_slide: Path
) -> None:
    cache = SlideCache(capacity_bytes=8 * 1024 * 1024, max_idle_handles=2)
    paths = [odd_pyramid, rgba_slide, glass_slide, pen_slide]
    for _ in range(3):
        for p in paths:
            s = cache.acquire(p)
            assert s.read_region_rgb(0, 0, 0, 8, 8).shape == (8, 8, 3)
            cache.release(s)
            assert cache.idle_count <= 2
    a, b = cache.acquire(pen_slide), cache.acquire(pen_slide)
    assert a is not b  # a handle is lent to one user at a time
    cache.release(a)
    cache.release(b)
    cache.clear()
    assert cache.idle_count == 0


def test_reader_with_shared_cache(odd_pyramid: Path) -> None:
    cache = SlideCache(max_idle_handles=4)
    with open_slide(odd_pyramid, cache=cache) as slide:
        plan = plan_tiling(slide, TilingOptions())
    n = sum(len(b) for b in PatchReader(odd_pyramid, plan.grid, cache=cache).iter_batches())
    assert n == len(plan.grid) > 0
    assert 1 <= cache.idle_count <= 2
    cache.clear()


def test_images_are_white_padded_uint8(odd_pyramid: Path) -> None:
    with open_slide(odd_pyramid) as slide:
        plan = plan_tiling(slide, TilingOptions(min_tissue_fraction=0.0))
    edge = np.flatnonzero(plan.grid.is_edge)
    assert edge.size
    for batch in PatchReader(odd_pyramid, plan.grid).iter_batches(edge[-1:]):
        img = batch.images[0]
        assert img.dtype == np.uint8 and img.shape == (224, 224, 3)
        assert (img[-1, -1] == 255).all()  # past the slide corner: white, never black
