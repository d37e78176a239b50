"""What the server's parts report as they work, free of any metrics library.

The call path, the analysis pipeline, the model worker and the result cache report
through an :class:`Observer` passed in to them; :class:`Observer` itself does
nothing (no metrics configured). :class:`histohelper.server.metrics.ServerMetrics`
is the observer that turns the reports into Prometheus metrics. This module imports
nothing outside the standard library, so the parts that report need no
``prometheus_client`` (and the tiler and the runtimes know nothing of either: the
pipeline hands the tiler a plain callback, see :attr:`Observer.read_batch`).

Every method is called on whatever thread does the work (event loop, call threads,
reader threads, model-worker threads) and must be cheap and thread-safe.
"""

from __future__ import annotations

#: Stages timed by :meth:`Observer.stage` (the ``stage`` label of
#: ``histohelper_stage_seconds``).
STAGES = ("tiling", "read", "model_batch", "mil")


class Observer:
    """Receives the server's reports; this base class ignores them all."""

    def stage(self, stage: str, seconds: float) -> None:
        """One run of a stage took ``seconds`` (wall clock).

        Args:
            stage: one of :data:`STAGES`: ``tiling`` (slide open, tissue mask and patch
                grid of one slide), ``read`` (one batch of patches read, decoded and
                resized by one reader thread), ``model_batch`` (one model call on a
                batch, on the model worker's thread), ``mil`` (the slide head over one
                bag, MC-dropout passes included).
            seconds: duration in seconds.
        """

    def read_batch(self, seconds: float) -> None:
        """One batch of patches was read in ``seconds`` (the tiler's callback)."""
        self.stage("read", seconds)

    def patches_classified(self, count: int) -> None:
        """The model classified ``count`` more patches (one model batch)."""

    def call_ended(
        self, rpc: str, code: str, reason: str | None, duration_s: float, model: str = ""
    ) -> None:
        """A call ended (once per call, where its audit record is written).

        Args:
            rpc: method name (``AnalyzeSlide``, ...).
            code: the gRPC status name the client got (``OK``, ``NOT_FOUND``, ...).
            reason: the ErrorInfo reason of a failure (None for OK and where none).
            duration_s: seconds from the call's arrival to its end.
            model: ``NAME:VERSION`` of the model version the call used ("" if none).
        """

    def cache_lookup(self, hit: bool) -> None:
        """The result cache answered a lookup: a hit (served from the cache) or a miss."""


#: The observer of a server without metrics.
NULL_OBSERVER = Observer()
