"""Prometheus metrics of one running server (library: ``prometheus_client``).

:class:`ServerMetrics` is the server's :class:`~.observe.Observer`: it owns its own
``CollectorRegistry`` (never the process-wide default, so several servers in one
process keep their own counts) and serves it in Prometheus's text format over HTTP
on ``--metrics-host``:``--metrics-port`` (off by default) with
``prometheus_client.start_http_server``; :meth:`ServerMetrics.close` closes the port.

Metrics (all prefixed ``histohelper_``):

- ``calls_total{rpc,code,reason}``: calls ended, by method, gRPC status name and
  ErrorInfo reason (empty for OK), counted where the call path writes the audit record.
- ``analyses_in_flight``: AnalyzeSlide and ExplainPatches calls holding an analysis
  slot; ``analyses_queued``: such calls that arrived and are not yet admitted
  (authentication and validation run before admission; admission itself never waits).
- ``slots_free{pool}``: free slots of each admission pool (analysis, classify, upload).
- ``patches_classified_total{model,version}``: patches each model version classified
  (every RPC).
- ``slide_seconds{model,version}``: histogram of the whole AnalyzeSlide call, arrival
  to end, of calls that ended OK, by the model version that served.
- ``stage_seconds{stage}``: histograms of ``tiling`` (per slide), ``read`` (per batch
  and reader thread), ``model_batch`` (per model call), ``mil`` (per bag).
- ``cache_requests_total{result}``: result-cache lookups, ``hit`` or ``miss``.
- ``model_info{name,version,engine,precision,untrained}``: 1 per loaded model version
  (a version's series goes when it unloads).

Gauges are computed when scraped (``set_function``), so they cost nothing per call.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from histohelper.server.observe import STAGES, Observer

if TYPE_CHECKING:
    from histohelper.server.runtime import ModelRuntime

log = logging.getLogger(__name__)

PREFIX = "histohelper_"
#: Buckets (seconds) of the slide latency: a biopsy in a second to a resection in an hour.
SLIDE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
#: Buckets (seconds) of the stages: a 1 ms read to a minute-long tissue mask.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: The pool whose slots are the analyses in flight.
ANALYSIS_POOL = "analysis"


class _Pool(Protocol):
    size: int

    @property
    def in_use(self) -> int: ...


class ServerMetrics(Observer):
    """Prometheus metrics of one server; the server's observer (see the module).

    Thread-safe: reports come from the event loop, call threads, reader threads and
    model-worker threads; scrapes from the HTTP server's threads.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            f"{PREFIX}calls",
            "Calls ended, by RPC, gRPC status code and ErrorInfo reason (empty when OK)",
            ("rpc", "code", "reason"),
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}analyses_in_flight",
            "AnalyzeSlide and ExplainPatches calls holding an analysis slot",
            registry=r,
        )
        self.queued = Gauge(
            f"{PREFIX}analyses_queued",
            "AnalyzeSlide and ExplainPatches calls arrived and not yet admitted",
            registry=r,
        )
        self.slots_free = Gauge(
            f"{PREFIX}slots_free", "Free slots of each admission pool", ("pool",), registry=r
        )
        self.patches = Counter(
            f"{PREFIX}patches_classified",
            "Patches each model version classified (every RPC)",
            ("model", "version"),
            registry=r,
        )
        self.slide_seconds = Histogram(
            f"{PREFIX}slide_seconds",
            "Whole AnalyzeSlide calls that ended OK, arrival to end (seconds), by model version",
            ("model", "version"),
            buckets=SLIDE_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}stage_seconds",
            "Stages of an analysis (seconds): tiling per slide, read per batch and reader "
            "thread, model_batch per model call, mil per bag",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            f"{PREFIX}cache_requests", "Result-cache lookups by result", ("result",), registry=r
        )
        self.model_info = Gauge(
            f"{PREFIX}model_info",
            "Each loaded model version (value 1)",
            ("name", "version", "engine", "precision", "untrained"),
            registry=r,
        )
        # Children looked up once: a report is then one lock and one add.
        self._stages = {name: self.stage_seconds.labels(name) for name in STAGES}
        self._cache = {
            hit: self.cache_requests.labels("hit" if hit else "miss") for hit in (True, False)
        }
        self._models_lock = threading.Lock()
        self._model_labels: dict[tuple[str, str], tuple[str, ...]] = {}
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- what the server is made of (called once, at start) ------------------------------

    def watch_pools(self, pools: Mapping[str, _Pool], waiting: Callable[[str], int]) -> None:
        """Compute the slot gauges from the admission pools when scraped.

        Args:
            pools: the call path's slot pools by name.
            waiting: calls of a pool that arrived and are not yet admitted.
        """
        for name, pool in pools.items():
            self.slots_free.labels(name).set_function(_free_slots(pool))
        analysis = pools.get(ANALYSIS_POOL)
        if analysis is not None:
            self.in_flight.set_function(lambda: analysis.in_use)
        self.queued.set_function(lambda: waiting(ANALYSIS_POOL))

    def set_model(self, runtime: ModelRuntime, name: str = "", version: str = "") -> None:
        """Add a ``model_info`` series for a loaded version: its repository ``name`` and
        ``version`` (default: the manifest's), engine, precision, untrained."""
        m = runtime.manifest
        labels = (
            name or m.model_name,
            version or m.model_version,
            runtime.engine,
            runtime.precision,
            "true" if m.untrained else "false",
        )
        with self._models_lock:
            self._model_labels[(labels[0], labels[1])] = labels
        self.model_info.labels(*labels).set(1)
        self.slide_seconds.labels(labels[0], labels[1])  # its series exist from the load on

    def drop_model(self, name: str, version: str) -> None:
        """Remove the ``model_info`` series of an unloaded version (counts stay)."""
        with self._models_lock:
            labels = self._model_labels.pop((name, version), None)
        if labels is not None:
            with contextlib.suppress(KeyError):
                self.model_info.remove(*labels)

    def for_model(self, name: str, version: str) -> Observer:
        """The observer of one model version's worker and pipeline: patch counts
        labelled with ``model`` and ``version``, everything else as this one."""
        return _ModelObserver(self, self.patches.labels(name, version))

    # --- Observer -----------------------------------------------------------------------

    def stage(self, stage: str, seconds: float) -> None:
        child = self._stages.get(stage)
        (child if child is not None else self.stage_seconds.labels(stage)).observe(seconds)

    def patches_classified(self, count: int) -> None:
        self.patches.labels("", "").inc(count)

    def call_ended(
        self, rpc: str, code: str, reason: str | None, duration_s: float, model: str = ""
    ) -> None:
        self.calls.labels(rpc, code, reason or "").inc()
        if rpc == "AnalyzeSlide" and code == "OK":
            name, _, version = model.partition(":")
            self.slide_seconds.labels(name, version).observe(duration_s)

    def cache_lookup(self, hit: bool) -> None:
        self._cache[bool(hit)].inc()

    # --- HTTP ---------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve the metrics over HTTP at ``host:port`` (``/metrics``, any path).

        Args:
            host: interface; a non-loopback one is logged as a warning (the metrics
                name no slide, but they tell load and model to whoever can reach them).
            port: TCP port (> 0).

        Returns:
            The bound port.

        Raises:
            OSError: the port cannot be bound.
        """
        if not is_loopback(host):
            log.warning(
                "metrics served on a non-loopback interface: anyone who can reach it can read them",
                extra={"metrics_host": host, "metrics_port": port},
            )
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._httpd.server_port)
        log.info("metrics served", extra={"metrics_port": self.port})
        return self.port

    def close(self) -> None:
        """Stop serving and close the port (a no-op when not serving)."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join()


class _ModelObserver(Observer):
    """One model version's reports: its patches under its labels (see ``for_model``)."""

    def __init__(self, base: ServerMetrics, patches: Counter) -> None:
        self._base = base
        self._patches = patches

    def stage(self, stage: str, seconds: float) -> None:
        self._base.stage(stage, seconds)

    def patches_classified(self, count: int) -> None:
        self._patches.inc(count)

    def call_ended(
        self, rpc: str, code: str, reason: str | None, duration_s: float, model: str = ""
    ) -> None:
        self._base.call_ended(rpc, code, reason, duration_s, model)

    def cache_lookup(self, hit: bool) -> None:
        self._base.cache_lookup(hit)


def _free_slots(pool: _Pool) -> Callable[[], float]:
    return lambda: pool.size - pool.in_use


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
