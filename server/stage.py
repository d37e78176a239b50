"""The read -> predict stage: image batches in, model outputs out, in order.

One bounded first-in-first-out queue of model calls in flight, shared by
AnalyzeSlide (:class:`~.pipeline.Analyzer`), ExplainPatches (:class:`~.explain.Explainer`)
and ClassifyPatches (:class:`~.classify.Classifier`). The batches come from any
iterator (the tiler's reader threads, or decoded request images); while the model
worker computes the oldest calls, the iterator produces the next batch, so reading
overlaps compute. Back-pressure: at most ``depth`` calls are in flight; the next batch
is taken from the iterator only after the oldest result was handed on.

Cancellation: ``stop`` is checked before each batch is taken and before each wait for
a result; closing the iterator (or stopping) cancels the calls not yet started (the
worker skips a cancelled job) and closes the batch iterator.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from histohelper.server.runtime import PatchOutput
from histohelper.server.worker import ModelWorker

B = TypeVar("B")


@dataclass(frozen=True)
class Submitted(Generic[B]):
    """A batch was handed to the model worker (its result comes later, in order)."""

    batch: B


@dataclass(frozen=True)
class Predicted(Generic[B]):
    """A batch and the model's output for it.

    Attributes:
        batch: the batch as the iterator gave it.
        output: the model's output for its B images (probabilities [B, C], logits
            [B, C], embeddings [B, D] float32; CAMs [B, C, h, w] when asked), or None
            for a batch with no images (never sent to the model).
    """

    batch: B
    output: PatchOutput | None


def predict_in_order(
    worker: ModelWorker,
    batches: Iterable[B],
    images: Callable[[B], npt.NDArray[np.uint8]],
    *,
    depth: int,
    stop: threading.Event,
    want_cams: bool = False,
    report_submits: bool = False,
) -> Generator[Predicted[B] | Submitted[B], None, None]:
    """Run every batch through the model, keeping up to ``depth`` calls in flight.

    Args:
        worker: the model's one owner; each batch becomes one ``predict_patches`` call.
        batches: the batches, in the order their results are wanted (an iterator that
            has a ``close`` method is closed when this one ends).
        images: the batch's images, uint8 RGB [B, S, S, 3] at the model's input size;
            a batch with B = 0 is not sent to the model (``Predicted.output`` None).
        depth: most model calls in flight (>= 1); the oldest result is awaited once
            ``depth`` calls are queued.
        stop: when set, no further batch is taken or awaited and the iteration ends.
        want_cams: ask the model for class activation maps too.
        report_submits: also yield :class:`Submitted` right after each batch is
            queued, before its result is awaited (the analysis sends its Started event
            then, so encoding it overlaps the first model call).

    Yields:
        :class:`Predicted` for every batch, in the order of ``batches`` (and, when
        asked, a :class:`Submitted` before it). Nothing after ``stop`` is set.

    Raises:
        ValueError: ``depth`` < 1.
        Whatever the batch iterator or a model call raises; the calls still queued are
        cancelled first.
    """
    if depth < 1:
        raise ValueError("depth must be >= 1")
    pending: deque[tuple[B, Future[PatchOutput] | None]] = deque()

    def oldest() -> Predicted[B]:
        batch, future = pending.popleft()
        return Predicted(batch, None if future is None else future.result())

    source = iter(batches)
    try:
        for batch in source:
            if stop.is_set():
                return
            pixels = images(batch)
            future = worker.predict_patches(pixels, want_cams=want_cams) if len(pixels) else None
            pending.append((batch, future))
            if report_submits and future is not None:
                yield Submitted(batch)
            while len(pending) >= depth:
                if stop.is_set():
                    return
                yield oldest()
        while pending:
            if stop.is_set():
                return
            yield oldest()
    finally:
        for _, future in pending:
            if future is not None:
                future.cancel()
        close = getattr(source, "close", None)
        if close is not None:
            close()
