"""One owner of the model's device: a single thread that runs every model call.

Analyses and ClassifyPatches calls submit work and get a ``concurrent.futures.Future``;
the worker thread executes jobs in submission order, so torch is never called from
gRPC handler threads and never from two threads at once. A job whose future was
cancelled before it started is skipped, which is how a cancelled analysis stops
costing compute within one batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from histohelper.server.runtime import ModelRuntime, PatchOutput, SlideOutput

log = logging.getLogger(__name__)

T = TypeVar("T")

_STOP = object()


class ModelWorker:
    """Runs model calls on one dedicated thread.

    Args:
        runtime: the loaded model; only this worker's thread calls it after start.
        max_pending: bound on queued jobs; ``submit`` blocks past it (back-pressure).
    """

    def __init__(self, runtime: ModelRuntime, *, max_pending: int = 16) -> None:
        self.runtime = runtime
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self.jobs_done = 0  # jobs executed (not skipped); read by tests and metrics
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            func, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = func()
            except BaseException as exc:  # delivered to the submitter
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                self.jobs_done += 1

    def call(self, func: Callable[[], T]) -> Future[T]:
        """Queue ``func`` to run on the worker thread; returns its future."""
        future: Future[T] = Future()
        self._jobs.put((func, future))
        return future

    def predict_patches(
        self, images: npt.NDArray[np.uint8], *, want_cams: bool = False
    ) -> Future[PatchOutput]:
        """Queue ``runtime.predict_patches`` on ``images`` [B, H, W, 3] uint8 RGB."""
        return self.call(lambda: self.runtime.predict_patches(images, want_cams=want_cams))

    def aggregate(self, embeddings: npt.NDArray[np.float32]) -> Future[SlideOutput]:
        """Queue ``runtime.aggregate`` on a bag ``embeddings`` [N, D] float32."""
        return self.call(lambda: self.runtime.aggregate(embeddings))

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the thread after the queued jobs."""
        self._jobs.put(_STOP)
        self._thread.join(timeout)
