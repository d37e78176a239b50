"""One owner of the model's device: worker threads that run every model call.

Analyses and ClassifyPatches calls submit work and get a ``concurrent.futures.Future``;
the worker threads start jobs in submission order, so the model is never called from
gRPC handler threads. There are ``runtime.concurrency`` threads: one for TorchScript
and ONNX Runtime (one call uses every core, so torch is never called from two threads
at once), one per stream for OpenVINO (each call runs on its own cores). A job whose
future was cancelled before it started is skipped, which is how a cancelled analysis
stops costing compute within one batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from histohelper.server.observe import NULL_OBSERVER, Observer
from histohelper.server.runtime import ModelRuntime, PatchOutput, SlideOutput
from histohelper.server.runtime.types import MC_DROPOUT_SEED, McDropoutOutput

log = logging.getLogger(__name__)

T = TypeVar("T")

_STOP = object()


class ModelWorker:
    """Runs model calls on dedicated threads (``runtime.concurrency`` of them).

    Args:
        runtime: the loaded model; only this worker's threads call it after start.
        max_pending: bound on queued jobs; ``submit`` blocks past it (back-pressure).
        observer: told the duration (stage ``model_batch``) and patch count of every
            :meth:`predict_patches` call that ran.

    Attributes:
        concurrency: jobs that run at once (``runtime.concurrency``, at least 1).
    """

    def __init__(
        self, runtime: ModelRuntime, *, max_pending: int = 16, observer: Observer = NULL_OBSERVER
    ) -> None:
        self.runtime = runtime
        self.observer = observer
        self.concurrency = max(1, int(runtime.concurrency))
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._done_lock = threading.Lock()
        self.jobs_done = 0  # jobs executed (not skipped); read by tests and metrics
        self._threads = [
            threading.Thread(target=self._run, name=f"model-worker-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()

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
                self._count_done()
                future.set_exception(exc)
            else:
                self._count_done()
                future.set_result(result)

    def _count_done(self) -> None:
        # Counted before the future resolves, so whoever sees the result sees the count.
        with self._done_lock:
            self.jobs_done += 1

    def call(self, func: Callable[[], T]) -> Future[T]:
        """Queue ``func`` to run on a worker thread; returns its future."""
        future: Future[T] = Future()
        self._jobs.put((func, future))
        return future

    def predict_patches(
        self, images: npt.NDArray[np.uint8], *, want_cams: bool = False
    ) -> Future[PatchOutput]:
        """Queue ``runtime.predict_patches`` on ``images`` [B, H, W, 3] uint8 RGB."""

        def run() -> PatchOutput:
            t0 = time.perf_counter()
            out = self.runtime.predict_patches(images, want_cams=want_cams)
            self.observer.stage("model_batch", time.perf_counter() - t0)
            self.observer.patches_classified(len(images))
            return out

        return self.call(run)

    def warm_up(self, batch_sizes: tuple[int, ...]) -> Future[float]:
        """Queue one batch of random patches per size in ``batch_sizes``, and a bag of
        two; the future gives the seconds it took.

        Engines that compile or allocate per input shape (OpenVINO, ONNX Runtime)
        pay that on their first batch of each size (see benchmarks/RESULTS.md);
        warming up at start keeps that off the first request.
        """
        manifest = self.runtime.manifest
        side = manifest.patch_size_px

        def run() -> float:
            t0 = time.perf_counter()
            rng = np.random.default_rng(0)
            for n in dict.fromkeys(batch_sizes):
                images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
                self.runtime.predict_patches(images)
            bag = rng.standard_normal((2, manifest.embedding_dim)).astype(np.float32)
            self.runtime.aggregate(bag)
            return time.perf_counter() - t0

        return self.call(run)

    def aggregate(self, embeddings: npt.NDArray[np.float32]) -> Future[SlideOutput]:
        """Queue ``runtime.aggregate`` on a bag ``embeddings`` [N, D] float32."""
        return self.call(lambda: self.runtime.aggregate(embeddings))

    def aggregate_mc(
        self,
        embeddings: npt.NDArray[np.float32],
        passes: int,
        seed: int = MC_DROPOUT_SEED,
        *,
        stop: threading.Event | None = None,
    ) -> Future[McDropoutOutput]:
        """Queue ``runtime.aggregate_mc``: ``passes`` Monte-Carlo dropout passes over a
        bag ``embeddings`` [N, D] float32, masks seeded with ``seed``; ``stop`` ends it
        between chunks of passes (AnalysisCancelledError)."""
        return self.call(lambda: self.runtime.aggregate_mc(embeddings, passes, seed, stop=stop))

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the threads after the queued jobs (``timeout`` seconds for each)."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
