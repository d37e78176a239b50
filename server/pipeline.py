"""The analysis of one slide, free of gRPC: tiling -> reading -> model -> MIL.

:meth:`Analyzer.run` yields domain events (dataclasses below) that the servicer turns
into protobuf messages. Reading and decoding run in the tiler's reader threads
(bounded queue) while the model worker computes the previous batch; results stream
out as each batch finishes. Only the bag of embeddings (N x D float32) is kept for
the slide-level aggregation; nothing proportional to slide area is held.

Cancellation: the caller sets ``stop`` (from gRPC's RPC-termination callback); the
loop, the readers and queued model jobs all observe it, so work ends within one
batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.errors import AnalysisCancelledError, CorruptSlideError
from histohelper.server.observe import NULL_OBSERVER, Observer
from histohelper.server.runtime import SlideOutput
from histohelper.server.runtime.types import McDropoutOutput
from histohelper.server.stage import Submitted, predict_in_order
from histohelper.server.tiling import (
    PatchReader,
    SlideCache,
    TilingOptions,
    TilingPlan,
    open_slide,
    plan_tiling,
)
from histohelper.server.tiling.slide import SlideSource
from histohelper.server.tiling.stain import (
    NO_STAIN,
    NOT_APPLIED,
    AppliedStain,
    StainChoice,
    StainNormalizer,
    fit_normalizer,
)
from histohelper.server.worker import ModelWorker

log = logging.getLogger(__name__)

ATTENTION_CHUNK = 16_384  # attention weights per AttentionChunk message (~130 KB)
PIPELINE_DEPTH = 2  # model batches in flight with one worker thread; +1 per extra thread
FIRST_BATCH_SIZE = 8  # patches in the first batch, so the first result comes out early


@dataclass(frozen=True)
class AnalysisSpec:
    """One AnalyzeSlide request in domain terms.

    Attributes:
        request_id: id for logs and events (never the slide name).
        slide_path: resolved path inside the slide root, or a slide source that
            is not a file (a DICOMweb series: :class:`~.dicomweb.DicomWebSource`).
        tiling: tiling options with every default filled in.
        batch_size: patches per model batch.
        return_embeddings: include embeddings [B, D] in patch events.
        return_attention: emit attention events before completion.
        return_cams: include class activation maps and logits in patch events.
        mc_dropout_passes: Monte-Carlo dropout passes of the slide head after the
            deterministic one (0: off); validated against the model beforehand.
        stain: the stain normalisation, resolved (fitted once per slide on the plan's
            tissue pixels, applied per patch in the reader threads).
    """

    request_id: str
    slide_path: Path | SlideSource
    tiling: TilingOptions
    batch_size: int
    return_embeddings: bool = False
    return_attention: bool = False
    return_cams: bool = False
    mc_dropout_passes: int = 0
    stain: StainChoice = NO_STAIN


@dataclass(frozen=True)
class Started:
    """Tiling is done: the grid, mask and thumbnail are known (and the stain fit)."""

    request_id: str
    plan: TilingPlan
    tiling_s: float
    stain: AppliedStain = NOT_APPLIED


@dataclass(frozen=True)
class PatchesDone:
    """Model results of one batch.

    Attributes:
        indices: int64 [B] bag indices (into ``plan.grid`` arrays).
        probabilities: float32 [B, C] softmax over patch classes.
        embeddings: float32 [B, D], or None unless requested.
        failed: int64 [F] bag indices whose pixels could not be read.
        cams: float32 [B, C, h, w] class activation maps, or None unless requested.
        logits: float32 [B, C] patch logits, or None unless CAMs were requested.
    """

    indices: npt.NDArray[np.int64]
    probabilities: npt.NDArray[np.float32]
    embeddings: npt.NDArray[np.float32] | None
    failed: npt.NDArray[np.int64]
    cams: npt.NDArray[np.float32] | None = None
    logits: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class Progress:
    """Patches finished so far (classified + failed) out of the bag size."""

    done: int
    total: int
    elapsed_s: float


@dataclass(frozen=True)
class AttentionDone:
    """MIL attention for a chunk of the bag: int64 [n] indices, float32 [n] weights."""

    indices: npt.NDArray[np.int64]
    attention: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Completed:
    """The analysis ended normally.

    Attributes:
        outcome: "completed", or "no_tissue" when the grid is empty (no prediction).
        slide: slide logits/probabilities/attention, None for "no_tissue".
        failed_count: patches whose pixels could not be read (left out of the bag).
        timings: seconds: tiling_s, first_result_s, inference_s, aggregate_s, total_s;
            and patches_per_s.
        uncertainty: Monte-Carlo dropout summary when requested, else None.
    """

    request_id: str
    outcome: Literal["completed", "no_tissue"]
    slide: SlideOutput | None
    plan: TilingPlan
    failed_count: int
    timings: dict[str, float]
    uncertainty: McDropoutOutput | None = None


Event = Started | PatchesDone | Progress | AttentionDone | Completed


def resize_batch(images: npt.NDArray[np.uint8], size_px: int) -> npt.NDArray[np.uint8]:
    """Resize a batch [B, H, W, 3] uint8 to [B, size_px, size_px, 3] (OpenCV INTER_AREA
    when the image's area shrinks, INTER_LINEAR when it grows; non-square images are
    stretched to the square).

    :class:`Analyzer` does not use it: it reads slide patches at the model's size
    directly (``PatchReader(output_size_px=...)``), without a full-size intermediate."""
    if images.shape[1] == size_px and images.shape[2] == size_px:
        return images
    shrink = images.shape[1] * images.shape[2] > size_px * size_px
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    out = np.empty((images.shape[0], size_px, size_px, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = cv2.resize(image, (size_px, size_px), interpolation=interp)
    return out


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def limit_heap_retention(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations >= ``threshold_bytes`` with mmap and return them on free.

    glibc raises its mmap threshold after the first large free (up to 32 MiB), after
    which patch batches (4.8 MB at 32 x 224 px) come from per-thread malloc arenas
    that keep their pages: server RSS then grew with the number of batches read.
    A fixed threshold keeps RSS on a plateau (see benchmarks/RESULTS.md).
    Process-wide; a no-op where glibc is absent.

    Returns:
        True if the threshold was set.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


class Analyzer:
    """Runs analyses against one model worker.

    Args:
        worker: the model's one owner.
        num_readers: reader threads per analysis.
        max_patches_per_slide: bigger grids raise :class:`SlideTooLargeError`.
        max_failed_fraction: share of unreadable patches tolerated per slide.
        slide_cache: shared OpenSlide tile cache and handle LRU.
        observer: told how long each stage took (``tiling`` per plan, ``read`` per
            batch, ``mil`` per bag; ``model_batch`` is the worker's).
    """

    def __init__(
        self,
        worker: ModelWorker,
        *,
        num_readers: int = 2,
        max_patches_per_slide: int = 1_000_000,
        max_failed_fraction: float = 0.05,
        slide_cache: SlideCache | None = None,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.worker = worker
        self.observer = observer
        self.num_readers = num_readers
        self.max_patches_per_slide = max_patches_per_slide
        self.max_failed_fraction = max_failed_fraction
        self.slide_cache = slide_cache
        limit_heap_retention()

    def plan(self, spec: AnalysisSpec, stop: threading.Event | None = None) -> TilingPlan:
        """Open the slide and compute its tissue mask and patch grid.

        Args:
            spec: the request.
            stop: when set, tiling ends between reads of the low-resolution image.

        Raises:
            SlideNotFoundError, UnsupportedSlideError, CorruptSlideError: from the tiler.
            SlideTooLargeError: more patches than ``max_patches_per_slide``, or a
                slide too costly to build a tissue mask of.
            AnalysisCancelledError: ``stop`` was set.
        """
        # The tiler counts kept patches as it builds the grid and stops at its limit:
        # give it this server's, so a huge grid is refused before it exists.
        limit = min(spec.tiling.max_patches, self.max_patches_per_slide)
        t0 = time.perf_counter()
        with open_slide(spec.slide_path, cache=self.slide_cache) as slide:
            plan = plan_tiling(slide, replace(spec.tiling, max_patches=limit), stop)
        self.observer.stage("tiling", time.perf_counter() - t0)
        return plan

    @staticmethod
    def fit_stain(
        spec: AnalysisSpec, plan: TilingPlan
    ) -> tuple[StainNormalizer | None, AppliedStain, TilingPlan]:
        """Fit the request's stain normalisation on the plan's tissue pixels (once per
        slide). A failed fit is no error: the patches go unnormalised and the returned
        plan carries the warning among its QC warnings."""
        normalizer, applied = fit_normalizer(spec.stain, plan.tissue_rgb)
        if applied.warning:
            plan = replace(plan, warnings=(*plan.warnings, applied.warning))
        return normalizer, applied, plan

    def _reader(
        self,
        spec: AnalysisSpec,
        plan: TilingPlan,
        normalizer: StainNormalizer | None = None,
    ) -> PatchReader:
        """The reader of the whole grid, in batches shaped for the model worker
        (stain-normalised on the reader threads when ``normalizer`` is given)."""
        return PatchReader(
            spec.slide_path,
            plan.grid,
            batch_size=spec.batch_size,
            num_workers=self.num_readers,
            max_failed_fraction=self.max_failed_fraction,
            cache=self.slide_cache,
            first_batch_size=min(FIRST_BATCH_SIZE, spec.batch_size),
            # With several model threads, the last batches are small (and of the
            # warmed-up first-batch size) so the threads finish together.
            tail_patches=spec.batch_size * self.worker.concurrency
            if self.worker.concurrency > 1
            else 0,
            tail_batch_size=min(FIRST_BATCH_SIZE, spec.batch_size),
            # Each read is resized straight to the model's input: a large grid patch
            # (up to 8192 px) never exists at full size in a batch.
            output_size_px=self.worker.runtime.manifest.patch_size_px,
            on_batch_read=self.observer.read_batch,
            transform=normalizer,
        )

    def run(
        self,
        spec: AnalysisSpec,
        stop: threading.Event,
        t0: float | None = None,
        plan: TilingPlan | None = None,
    ) -> Iterator[Event]:
        """Analyse one slide, yielding events as results become available.

        Args:
            spec: the request.
            stop: set by the caller to cancel; the run ends within one batch.
            t0: ``time.perf_counter()`` at request arrival (default: now).
            plan: the slide's tiling plan when the caller already made it with
                :meth:`plan` for this ``spec`` (default: made here).

        Yields:
            Started (once the first batch is submitted to the model, or before the
            first error), then PatchesDone/Progress per batch, then AttentionDone
            chunks (if requested), then Completed. Nothing after ``stop`` is set.

        Raises:
            HistoHelperError subclasses for slide, option and size problems;
            CorruptSlideError when too many patches fail to read.
        """
        t0 = time.perf_counter() if t0 is None else t0
        if plan is None:
            try:
                plan = self.plan(spec, stop)
            except AnalysisCancelledError:
                return  # stopped during tiling: nothing after stop is set
        normalizer, applied, plan = self.fit_stain(spec, plan)
        tiling_s = time.perf_counter() - t0
        started = Started(spec.request_id, plan, tiling_s, applied)
        grid = plan.grid
        n = len(grid)
        timings = {"tiling_s": tiling_s, "first_result_s": 0.0, "inference_s": 0.0}
        if n == 0:
            yield started
            timings["total_s"] = time.perf_counter() - t0
            yield Completed(spec.request_id, "no_tissue", None, plan, 0, timings)
            return

        manifest = self.worker.runtime.manifest
        bag = np.zeros((n, manifest.embedding_dim), dtype=np.float32)
        have = np.zeros(n, dtype=bool)
        done = 0
        failed_total = 0
        t_infer = time.perf_counter()
        # Started goes out once the first batch is with the model, so that encoding
        # and sending it (thumbnail PNG: ~45 ms for 1,024 px) overlaps the model;
        # it still precedes every other event, errors included.
        announced = False

        def announce() -> Iterator[Event]:
            nonlocal announced
            if not announced and not stop.is_set():
                announced = True
                yield started

        stage = predict_in_order(
            self.worker,
            self._reader(spec, plan, normalizer).iter_batches(stop=stop),
            lambda batch: batch.images,
            # One batch per worker thread plus one more, so every thread has its next
            # batch queued while the oldest result is sent.
            depth=PIPELINE_DEPTH + self.worker.concurrency - 1,
            stop=stop,
            want_cams=spec.return_cams,
            report_submits=True,
        )
        try:
            for item in stage:
                yield from announce()
                if isinstance(item, Submitted):
                    continue
                batch, out = item.batch, item.output
                failed_total += len(batch.failed)
                done += len(batch.indices) + len(batch.failed)
                if out is None:  # every patch of the batch failed to read
                    empty = np.zeros((0, len(manifest.patch_classes)), np.float32)
                    yield PatchesDone(
                        batch.indices.astype(np.int64), empty, None, batch.failed.astype(np.int64)
                    )
                    continue
                bag[batch.indices] = out.embeddings
                have[batch.indices] = True
                if not timings["first_result_s"]:
                    timings["first_result_s"] = time.perf_counter() - t0
                yield PatchesDone(
                    batch.indices.astype(np.int64),
                    out.probabilities,
                    out.embeddings if spec.return_embeddings else None,
                    batch.failed.astype(np.int64),
                    out.cams if spec.return_cams else None,
                    out.logits if spec.return_cams else None,
                )
                yield Progress(done, n, time.perf_counter() - t0)
            yield from announce()
        except Exception:
            yield from announce()
            raise
        finally:
            stage.close()
        if stop.is_set():
            log.info("analysis stopped", extra={"request_id": spec.request_id})
            return
        timings["inference_s"] = time.perf_counter() - t_infer

        members = np.flatnonzero(have)
        if members.size == 0:
            raise CorruptSlideError("no patch of the slide could be read")
        t_agg = time.perf_counter()
        slide = self.worker.aggregate(bag[members]).result()
        uncertainty = None
        if spec.mc_dropout_passes:
            try:
                uncertainty = self.worker.aggregate_mc(
                    bag[members], spec.mc_dropout_passes, stop=stop
                ).result()
            except AnalysisCancelledError:
                return  # stopped between chunks of passes: nothing after stop is set
        timings["aggregate_s"] = time.perf_counter() - t_agg
        self.observer.stage("mil", timings["aggregate_s"])
        if spec.return_attention:
            for start in range(0, members.size, ATTENTION_CHUNK):
                if stop.is_set():
                    return
                sl = slice(start, start + ATTENTION_CHUNK)
                yield AttentionDone(members[sl].astype(np.int64), slide.attention[sl])
        timings["total_s"] = time.perf_counter() - t0
        timings["patches_per_s"] = members.size / max(timings["inference_s"], 1e-9)
        yield Completed(
            spec.request_id, "completed", slide, plan, failed_total, timings, uncertainty
        )
