"""Read a grid's patches as uint8 RGB batches on a pool of reader threads.

OpenSlide releases the GIL while decoding, so threads give real parallelism. Each
batch is one task of a :class:`concurrent.futures.ThreadPoolExecutor`; a reading
thread borrows a :class:`Slide` handle no other thread holds at that time (one per
thread at most); a failed read closes and reopens that handle (OpenSlide errors latch)
and records the patch as failed. Memory is bounded: at most ``queue_depth +
num_workers`` batches are submitted and not yet handed on (finished ones wait, running
ones are being filled), each of at most ``max_batch_bytes``; patches are resized from
the read straight to the output size (the model's input), so a large grid patch never
exists at full size in a batch. Nothing polls: the consumer blocks until a batch is
done, and the stop event is checked between patches.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.errors import (
    CorruptSlideError,
    HistoHelperError,
    InvalidOptionsError,
    RegionOutOfBoundsError,
    SlideTooLargeError,
)

from .plan import PatchGrid
from .slide import Slide, SlideCache, SlideSource, open_slide

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchBatch:
    """One batch of patches.

    Attributes:
        indices: ``[B]`` int64 indices into the grid arrays of the patches in ``images``.
        images: ``[B, S, S, 3]`` uint8 RGB (S = the reader's ``output_size_px``,
            by default ``grid.patch_size_px``), white-padded past the slide edge.
        failed: ``[F]`` int64 grid indices whose read failed in this batch.
    """

    indices: npt.NDArray[np.int64]
    images: npt.NDArray[np.uint8]
    failed: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def read_patch(
    slide: Slide, grid: PatchGrid, index: int, output_size_px: int | None = None
) -> npt.NDArray[np.uint8]:
    """Read one grid patch and resize it straight to the output size.

    Reads ``grid.read_width_px x grid.read_height_px`` px at ``grid.level`` starting
    at the patch's level-0 origin, composites on white, and resizes once, from the
    read to ``output_size_px`` (OpenCV INTER_AREA when shrinking on both axes,
    INTER_LINEAR otherwise), so an 8192 px grid patch served to a 224 px model never
    exists at 8192 px. No resize when the read already has the output size (the usual
    case: the level matches the target and the output is the grid's patch size).

    A cell whose footprint starts inside the slide but whose read, rounded to the
    level's px, starts at or past the edge (less than half a level px of slide in it)
    is white.

    Args:
        slide: an open slide (the grid's slide).
        grid: the patch grid.
        index: index into the grid arrays.
        output_size_px: side of the returned patch (px, >= 1); default
            ``grid.patch_size_px``.

    Returns:
        ``[S, S, 3]`` uint8 RGB, S = ``output_size_px``.

    Raises:
        CorruptSlideError: the region could not be decoded (handle already reopened).
        RegionOutOfBoundsError: the patch's origin lies outside the slide (a grid of
            another slide).
    """
    s = grid.patch_size_px if output_size_px is None else output_size_px
    x_l0, y_l0 = float(grid.x_l0[index]), float(grid.y_l0[index])
    # Exact per-axis level position (the slide rounds it, or converts it to OpenSlide's
    # level-0 convention when OpenSlide reads the region).
    x_lv = x_l0 / grid.level_downsample_x
    y_lv = y_l0 / grid.level_downsample_y
    rw, rh = grid.read_width_px, grid.read_height_px
    try:
        rgb = slide.read_level_rgb(grid.level, x_lv, y_lv, rw, rh)
    except RegionOutOfBoundsError:
        md = slide.metadata
        if not (0 <= x_l0 < md.width_l0 and 0 <= y_l0 < md.height_l0):
            raise
        return np.full((s, s, 3), 255, dtype=np.uint8)
    if (rw, rh) != (s, s):
        interp = cv2.INTER_AREA if rw >= s and rh >= s else cv2.INTER_LINEAR
        rgb = np.asarray(cv2.resize(rgb, (s, s), interpolation=interp), dtype=np.uint8)
    return rgb


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: Python's (numpy's) MemoryError, or
    OpenCV's ``cv2.error`` with code ``StsNoMem`` ("Insufficient memory")."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, cv2.error) and getattr(exc, "code", None) == cv2.Error.StsNoMem


#: Default most bytes of one batch's images (256 MiB: 1,783 patches of 224 px, one of
#: 8192 px).
MAX_BATCH_BYTES = 256 * 1024 * 1024


def batch_sizes(
    total: int,
    batch_size: int,
    first_batch_size: int | None = None,
    tail_patches: int = 0,
    tail_batch_size: int | None = None,
) -> list[int]:
    """Sizes of the consecutive batches that cover ``total`` patches in order.

    The first batch has ``first_batch_size`` patches, the body ``batch_size``; the
    last ``tail_patches`` or more (the body's remainder joins them) are cut into
    batches of ``tail_batch_size``, the last one smaller. Several model threads then
    finish together: one does not run a long final batch while the others idle.

    Args:
        total: patches to cover (>= 0).
        batch_size: body batch size (>= 1).
        first_batch_size: first batch size (default ``batch_size``).
        tail_patches: patches at the end cut finer (0: none).
        tail_batch_size: batch size of the tail (default ``batch_size``).

    Returns:
        Positive sizes summing to ``total`` (empty when ``total`` is 0).
    """
    first = batch_size if first_batch_size is None else first_batch_size
    fine = batch_size if tail_batch_size is None else tail_batch_size
    if total <= 0:
        return []
    sizes = [min(first, total)]
    rest = total - sizes[0]
    tail = min(rest, max(tail_patches, 0))
    body, leftover = divmod(rest - tail, batch_size)
    sizes += [batch_size] * body
    tail += leftover
    sizes += [fine] * (tail // fine)
    if tail % fine:
        sizes.append(tail % fine)
    return sizes


class PatchReader:
    """Threaded, bounded-memory reader of a grid's patches.

    One batch's images take at most ``max_batch_bytes``: batch sizes (body, first and
    tail) are cut to ``max_batch_bytes // (3 * output_size_px**2)`` patches when
    larger, so a big output size gives smaller batches, never a huge allocation. At
    most ``queue_depth + num_workers + 1`` batches exist at once. Each worker also
    holds one read region (at most :data:`~.slide.MAX_REGION_PX` px) while reading.

    Args:
        path: slide file (each worker opens its own handle), or a
            :class:`~.slide.SlideSource` (e.g. a DICOMweb series; each worker opens it).
        grid: the :class:`PatchGrid` to read.
        batch_size: patches per batch (>= 1).
        num_workers: reader threads (>= 1), each with its own OpenSlide handle.
        queue_depth: finished batches buffered ahead of the consumer (>= 1).
        max_failed_fraction: share of requested patches allowed to fail before the
            slide is declared corrupt (0..1).
        cache: shared :class:`SlideCache` (tile cache and pooled handles).
        first_batch_size: size of the first batch (default ``batch_size``); a small
            first batch gets the first results out sooner (time to first result).
        tail_patches: the last this many patches are read in batches of
            ``tail_batch_size`` (see :func:`batch_sizes`; default 0: none).
        tail_batch_size: batch size of the tail (default ``batch_size``).
        output_size_px: side of the patches in the batches (px, >= 1; default
            ``grid.patch_size_px``). Each read is resized straight to it (see
            :func:`read_patch`): pass the model's input size.
        max_batch_bytes: most bytes of one batch's images (default
            :data:`MAX_BATCH_BYTES`).
        on_batch_read: called with the seconds each batch took to read (on the reader
            thread that read it; batches cut short by a stop are not reported), e.g.
            the server's metrics.
        transform: applied on the reader thread to each batch's images
            (``[B, S, S, 3]`` uint8 in, same shape and dtype out) before it is handed
            on, e.g. a fitted :class:`~.stain.StainNormalizer`; its time counts in the
            batch's read time.

    Raises:
        InvalidOptionsError: a parameter out of range.
        SlideTooLargeError: one patch at ``output_size_px`` exceeds ``max_batch_bytes``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | SlideSource,
        grid: PatchGrid,
        *,
        batch_size: int = 64,
        num_workers: int = 2,
        queue_depth: int = 4,
        max_failed_fraction: float = 0.05,
        cache: SlideCache | None = None,
        first_batch_size: int | None = None,
        tail_patches: int = 0,
        tail_batch_size: int | None = None,
        output_size_px: int | None = None,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        on_batch_read: Callable[[float], None] | None = None,
        transform: Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]] | None = None,
    ) -> None:
        if batch_size < 1 or num_workers < 1 or queue_depth < 1:
            raise InvalidOptionsError("batch_size, num_workers and queue_depth must be >= 1")
        if first_batch_size is not None and first_batch_size < 1:
            raise InvalidOptionsError("first_batch_size must be >= 1")
        if tail_batch_size is not None and tail_batch_size < 1:
            raise InvalidOptionsError("tail_batch_size must be >= 1")
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise InvalidOptionsError("max_failed_fraction must be in [0, 1]")
        if output_size_px is not None and output_size_px < 1:
            raise InvalidOptionsError("output_size_px must be >= 1")
        self._path: str | SlideSource = path if isinstance(path, SlideSource) else os.fspath(path)
        self.grid = grid
        self.output_size_px = grid.patch_size_px if output_size_px is None else output_size_px
        patch_bytes = 3 * self.output_size_px**2
        fit = max_batch_bytes // patch_bytes
        if fit < 1:
            raise SlideTooLargeError(
                f"one {self.output_size_px} px patch takes {patch_bytes} bytes, more than "
                f"the {max_batch_bytes} bytes allowed per batch",
                limit=str(max_batch_bytes),
            )
        self.max_batch_bytes = max_batch_bytes
        self.batch_size = min(batch_size, fit)
        first = batch_size if first_batch_size is None else first_batch_size
        self.first_batch_size = min(first, fit)
        self.tail_patches = max(0, int(tail_patches))
        tail = batch_size if tail_batch_size is None else tail_batch_size
        self.tail_batch_size = min(tail, fit)
        self.num_workers = num_workers
        self.queue_depth = queue_depth
        self.max_failed_fraction = max_failed_fraction
        self.cache = cache
        self.on_batch_read = on_batch_read
        self.transform = transform
        #: Grid indices that failed in the last iteration.
        self.failed_indices: list[int] = []

    def iter_batches(
        self, indices: Sequence[int] | None = None, stop: threading.Event | None = None
    ) -> Iterator[PatchBatch]:
        """Yield batches until every requested index was read or failed.

        Every requested index appears exactly once, in some batch's ``indices`` or
        ``failed``; batches arrive as they finish, not necessarily in order. Setting
        ``stop`` ends the iteration within about one patch read per thread; closing
        the generator early also stops and joins the reader threads.

        Args:
            indices: grid indices to read (default: all, in grid order).
            stop: optional event checked between patches.

        Yields:
            :class:`PatchBatch`.

        Raises:
            InvalidOptionsError: an index outside the grid.
            CorruptSlideError: failed reads exceed ``max_failed_fraction`` of the
                requested patches (raised with the batch that passes the limit).
            SlideTooLargeError: a reader ran out of memory (MemoryError, or OpenCV's
                out-of-memory error).
            SlideNotFoundError, UnsupportedSlideError: a reader could not open the slide.
        """
        idx = self._requested(indices)
        self.failed_indices = []
        if idx.size == 0:
            return
        chunks = self._chunks(idx)
        allowed = math.floor(self.max_failed_fraction * idx.size + 1e-9)
        halt = threading.Event()
        handles = _HandlePool(self._open, self._release)
        pool = ThreadPoolExecutor(
            max_workers=min(self.num_workers, len(chunks)), thread_name_prefix="patch-reader"
        )
        # Batches submitted and not yet handed on: read or being read, at most
        # queue_depth + num_workers (plus the one the consumer holds).
        window = self.queue_depth + self.num_workers
        pending: dict[Future[PatchBatch | None], None] = {}  # in submission order
        todo = iter(chunks)

        def halted() -> bool:
            return halt.is_set() or (stop is not None and stop.is_set())

        def refill() -> None:
            for chunk in itertools.islice(todo, window - len(pending)):
                pending[pool.submit(self._read_batch, chunk, handles, halted)] = None

        try:
            refill()
            while pending and not halted():
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in [f for f in pending if f in finished]:  # oldest first
                    del pending[future]
                    batch = future.result()
                    if batch is None or halted():  # stopped while reading
                        return
                    self._count_failures(batch, allowed, int(idx.size))
                    yield batch
                refill()
        finally:
            halt.set()
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            handles.close()

    def _requested(self, indices: Sequence[int] | None) -> npt.NDArray[np.int64]:
        """The requested grid indices as int64 [N] (all of the grid by default)."""
        idx = (
            np.arange(len(self.grid), dtype=np.int64)
            if indices is None
            else np.asarray(indices, dtype=np.int64).reshape(-1)
        )
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.grid)):
            raise InvalidOptionsError("patch index out of range")
        return idx

    def _chunks(self, idx: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
        """``idx`` cut into consecutive batches (see :func:`batch_sizes`)."""
        sizes = batch_sizes(
            int(idx.size),
            self.batch_size,
            self.first_batch_size,
            self.tail_patches,
            self.tail_batch_size,
        )
        bounds = np.cumsum([0, *sizes])
        return [idx[a:b] for a, b in itertools.pairwise(bounds.tolist())]

    def _count_failures(self, batch: PatchBatch, allowed: int, total: int) -> None:
        """Record the batch's failed reads; raise once more than ``allowed`` failed.

        Raises:
            CorruptSlideError: more than ``allowed`` of ``total`` patches failed.
        """
        if not batch.failed.size:
            return
        self.failed_indices.extend(batch.failed.tolist())
        if len(self.failed_indices) > allowed:
            raise CorruptSlideError(
                f"{len(self.failed_indices)} of {total} patches could not be "
                f"decoded (more than {self.max_failed_fraction:.1%})",
                failed_patches=str(len(self.failed_indices)),
                requested_patches=str(total),
            )

    def _read_batch(
        self,
        chunk: npt.NDArray[np.int64],
        handles: _HandlePool,
        halted: Callable[[], bool],
    ) -> PatchBatch | None:
        """Read one batch on a reader thread with a handle no other thread holds.

        Returns:
            The batch, or None when ``halted()`` became true between two patches.

        Raises:
            HistoHelperError: from opening the slide; SlideTooLargeError when memory
                ran out; CorruptSlideError for any other unexpected failure (logged).
        """
        try:
            t0 = time.perf_counter()
            with handles.borrow() as slide:
                batch = self._read_chunk(slide, chunk, halted)
            if batch is not None and self.on_batch_read is not None:
                self.on_batch_read(time.perf_counter() - t0)
            return batch
        except HistoHelperError:
            raise
        except Exception as exc:  # never lose an error in a thread
            if _out_of_memory(exc):  # a size problem, not a corrupt slide (DATA_LOSS)
                logger.warning("patch reader ran out of memory")
                raise SlideTooLargeError(
                    "the server ran out of memory reading patches: use a smaller "
                    "batch, patch size or target resolution"
                ) from None
            logger.exception("patch reader failed")
            raise CorruptSlideError(f"patch reading failed: {type(exc).__name__}") from None

    def _read_chunk(
        self, slide: Slide, chunk: npt.NDArray[np.int64], halted: Callable[[], bool]
    ) -> PatchBatch | None:
        """The patches of ``chunk`` read from ``slide``; unreadable ones listed as failed."""
        size = self.output_size_px
        images = np.empty((chunk.size, size, size, 3), dtype=np.uint8)
        ok: list[int] = []
        failed: list[int] = []
        prefetch = getattr(slide, "prefetch_patches", None)
        if prefetch is not None:  # a DICOMweb series: the batch's frames in one request
            prefetch(self.grid, chunk)
        for i in chunk.tolist():
            if halted():
                return None
            try:
                images[len(ok)] = read_patch(slide, self.grid, i, size)
                ok.append(i)
            except CorruptSlideError:
                failed.append(i)
        out = images[: len(ok)]
        if self.transform is not None and ok:
            out = self.transform(out)
        return PatchBatch(
            indices=np.asarray(ok, dtype=np.int64),
            images=out,
            failed=np.asarray(failed, dtype=np.int64),
        )

    def _open(self) -> Slide:
        if self.cache is not None and not isinstance(self._path, SlideSource):
            return self.cache.acquire(self._path)
        return open_slide(self._path)

    def _release(self, slide: Slide) -> None:
        if self.cache is not None:
            self.cache.release(slide)
        else:
            slide.close()


class _HandlePool:
    """Slide handles of one iteration: each lent to one reader thread at a time, opened
    on first need (at most one per thread), given back to the reader's cache (or
    closed) by :meth:`close`."""

    def __init__(self, open_: Callable[[], Slide], release: Callable[[Slide], None]) -> None:
        self._open = open_
        self._release = release
        self._idle: list[Slide] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Slide]:
        with self._lock:
            slide = self._idle.pop() if self._idle else None
        if slide is None:
            slide = self._open()
        try:
            yield slide
        finally:
            with self._lock:
                self._idle.append(slide)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for slide in idle:
            self._release(slide)
