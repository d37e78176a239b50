"""Assemble and run the gRPC server: servicer, health, reflection, limits, shutdown.

Standard services (grpcio-health-checking, grpcio-reflection):
``grpc.health.v1.Health`` reports SERVING for "" and the analysis service once the
model is loaded; on shutdown ``enter_graceful_shutdown()`` flips it to NOT_SERVING
before ``server.stop(grace)``.

Transport: ``grpc.aio`` on one event-loop thread; every call of the analysis service
runs through the one call path (:mod:`.callpath`: authentication, audit, decoding,
validation, admission, deadlines, stall limit, the error table); blocking work runs
on a bounded thread pool, so clients that stall hold no thread.

Security (see ``tls``, ``auth``, ``uploads``, ``audit``): TLS or mutual TLS when
configured (plaintext only on loopback or with ``allow_insecure``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from histohelper.errors import (
    HistoHelperError,
    ModelArtifactError,
    ServerBusyError,
    UploadQuotaError,
)
from histohelper.model_parts import untrained_warning
from histohelper.server.admin import ModelAdminServicer
from histohelper.server.audit import AuditLog
from histohelper.server.audit import current as current_call
from histohelper.server.auth import Authenticator, TokenStore
from histohelper.server.cache import ResultCache
from histohelper.server.callpath import CallLimits, CallPath, SlotPool, build_service
from histohelper.server.config import ServerConfig
from histohelper.server.metrics import ServerMetrics
from histohelper.server.models import ModelBuilder, ServedModel
from histohelper.server.observe import NULL_OBSERVER
from histohelper.server.repository import (
    ModelRepository,
    VersionPolicy,
    discover,
    single_model,
)
from histohelper.server.runtime import ModelRuntime
from histohelper.server.runtime.manifest import read_manifest
from histohelper.server.servicer import SlideAnalysisServicer
from histohelper.server.tls import check_transport_policy, server_credentials
from histohelper.server.uploads import UploadStore
from histohelper.server.worker import ModelWorker
from histohelper.v1 import model_admin_pb2 as admin_pb
from histohelper.v1 import slide_analysis_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SlideAnalysisService"].full_name
ADMIN_SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["ModelAdminService"].full_name


def model_health_name(name: str, version: str) -> str:
    """The health service name of a loaded model version:
    ``histohelper.v1.SlideAnalysisService/NAME:VERSION``."""
    return f"{SERVICE_NAME}/{name}:{version}"


@dataclass
class RunningServer:
    """A started server and its parts (tests use these to look inside).

    The gRPC server is a ``grpc.aio`` server on its own event-loop thread; blocking
    work runs on ``executor``. Every method here is called from ordinary threads.
    """

    server: grpc.aio.Server
    port: int
    config: ServerConfig
    health: health.aio.HealthServicer
    servicer: SlideAnalysisServicer
    worker: ModelWorker
    uploads: UploadStore
    audit_log: AuditLog
    loop: asyncio.AbstractEventLoop
    loop_thread: threading.Thread
    executor: futures.ThreadPoolExecutor
    call_path: CallPath
    health_server: grpc.aio.Server | None = None
    metrics: ServerMetrics | None = None
    models: ModelRepository[ServedModel] | None = None
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)
    _poller: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def rescan(self) -> list[str]:
        """Rescan the model repository now (SIGHUP, the poll); changes as log lines.
        A failure to list the repository is logged and changes nothing."""
        assert self.models is not None
        try:
            changes = self.models.rescan()
        except OSError as exc:
            log.warning("model repository could not be listed: %s", type(exc).__name__)
            return []
        if changes:
            log.info("model repository rescanned", extra={"changes": changes})
        return changes

    def start_polling(self, every_s: float) -> None:
        """Rescan every ``every_s`` seconds on a daemon thread until :meth:`stop`."""

        def poll() -> None:
            while not self._stopping.wait(every_s):
                self.rescan()

        self._poller = threading.Thread(target=poll, name="repository-poll", daemon=True)
        self._poller.start()

    @property
    def target(self) -> str:
        """``host:port`` for clients."""
        return f"{self.config.host}:{self.port}"

    @property
    def metrics_port(self) -> int:
        """The bound Prometheus metrics port; 0 when metrics are off."""
        return self.metrics.port if self.metrics is not None else 0

    def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Flip health to NOT_SERVING, keep accepting calls for ``drain`` seconds
        (default: config.drain_s), stop accepting, let in-flight calls finish for
        ``grace`` seconds (default: config.grace_s), then cancel them (their stop
        events are set; domain work ends within one batch). A second call waits for
        the first to finish and returns."""
        with self._stop_lock:
            if self.loop.is_closed():
                return
            self._stop(grace, drain)

    def _stop(self, grace: float | None, drain: float | None) -> None:
        self._stopping.set()
        if self._poller is not None:
            self._poller.join()
        self._await(self.health.enter_graceful_shutdown())
        drain_s = self.config.drain_s if drain is None else drain
        if drain_s > 0:
            log.info("draining: health NOT_SERVING, still accepting", extra={"seconds": drain_s})
            time.sleep(drain_s)
        self._await(self.server.stop(self.config.grace_s if grace is None else grace))
        # Calls cancelled by the stop still clean up, free their slots and write their
        # audit records before the loop goes.
        self._await(self.call_path.drain())
        if self.health_server is not None:
            self._await(self.health_server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join()
        self.loop.close()
        self.executor.shutdown(wait=True)
        if self.models is not None:
            self.models.on_change = None  # the event loop is closed: no health updates
            self.models.close()
        else:
            self.worker.close()
        self.uploads.close()
        self.audit_log.close()
        if self.metrics is not None:
            self.metrics.close()


#: gRPC's default SO_REUSEPORT lets a second server bind a port in use and silently take
#: a share of its connections; every server here binds without it.
_NO_REUSEPORT = ("grpc.so_reuseport", 0)


def _bind(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Add ``address`` to ``server``: the bound port, or 0 where it cannot be bound
    (grpcio returned 0 and now raises RuntimeError)."""
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:
        return 0


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments set deliberately: message sizes, keepalive, connection age,
    and no ``SO_REUSEPORT`` (:data:`_NO_REUSEPORT`)."""
    options = [
        _NO_REUSEPORT,
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.max_connection_age_s > 0:
        # A short age makes clients re-resolve DNS and find new replicas; the grace is
        # separate so that a long analysis is not cut off with its connection.
        options += [
            ("grpc.max_connection_age_ms", max(1, int(config.max_connection_age_s * 1000))),
            (
                "grpc.max_connection_age_grace_ms",
                max(1, int(config.max_connection_age_grace_s * 1000)),
            ),
        ]
    return options


def _repository(config: ServerConfig, builder: ModelBuilder) -> ModelRepository[ServedModel]:
    """The model repository of ``--model-repository``, or the one-model repository of
    ``--model`` (served under the manifest's model name and version), scanned and its
    defaults loaded.

    Raises:
        ModelArtifactError: no default version could be loaded (every one failed, or
            the repository holds none).
    """
    if config.model_repository is not None:
        root = config.model_repository

        def scan() -> dict:
            return discover(root)
    else:
        assert config.model_path is not None
        artifact = config.model_path
        try:
            manifest = read_manifest(artifact)
        except ModelArtifactError:
            raise
        except Exception as exc:
            raise ModelArtifactError(
                f"model artifact cannot be read: {type(exc).__name__}"
            ) from None

        def scan() -> dict:
            # The file's signature again: a SIGHUP loads a changed --model file anew
            # (or keeps the loaded one serving if the new file fails), as a repository.
            return single_model(artifact, manifest.model_name, manifest.model_version)

    models: ModelRepository[ServedModel] = ModelRepository(
        scan,
        builder,
        policy=VersionPolicy.parse(config.version_policy),
        default_model=config.default_model,
        max_loaded=config.max_loaded_models,
    )
    models.rescan()
    if models.default_loaded() is None:
        failed = [s.error for s in models.listing() if s.state == "failed"]
        models.close()
        raise ModelArtifactError(
            "no model version could be loaded"
            + (f" ({failed[0]})" if failed else " (the repository holds no model)")
        )
    return models


def _slot_pools(config: ServerConfig) -> dict[str, SlotPool]:
    """The admission pools of the call path, each refused with its own error."""
    n_analyses, n_uploads = config.max_concurrent_analyses, config.max_concurrent_uploads
    n_classify = config.max_classify_streams
    return {
        "analysis": SlotPool(
            n_analyses,
            lambda: ServerBusyError(f"the server is running {n_analyses} analyses; retry later"),
        ),
        "classify": SlotPool(
            n_classify,
            lambda: ServerBusyError(
                f"the server already has {n_classify} open ClassifyPatches streams; retry later"
            ),
        ),
        "upload": SlotPool(
            n_uploads,
            lambda: UploadQuotaError(f"{n_uploads} uploads are already in flight; retry later"),
        ),
    }


def _build_servicer(
    config: ServerConfig,
    models: ModelRepository[ServedModel],
    pools: dict[str, SlotPool],
) -> SlideAnalysisServicer:
    """The transport-free parts behind the service: the model repository (each
    version's analyzer, classifier and result-cache view) and uploads."""
    uploads = UploadStore(
        config.upload_dir,
        max_bytes=config.upload_max_bytes,
        quota_bytes=config.upload_quota_bytes,
        ttl_s=config.upload_ttl_s,
        max_concurrent=config.max_concurrent_uploads,
    )
    return SlideAnalysisServicer(config, models, uploads=uploads, analysis_slots=pools["analysis"])


async def _start_grpc(
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None,
    *services: grpc.GenericRpcHandler,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer, grpc.aio.Server | None]:
    """Bind and start the main port (the service, health, reflection) and the optional
    health port, on the running event loop; health then says SERVING.

    Raises:
        PortBindError: a port cannot be bound.
    """
    server = grpc.aio.server(options=grpc_options(config))
    server.add_generic_rpc_handlers(services)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = _bind(server, f"{config.host}:{config.port}", credentials)
    if port == 0:
        raise PortBindError(f"could not bind the server's port {config.host}:{config.port}")
    await server.start()
    health_server = None
    if config.health_port is not None:
        # Plaintext, health only (loopback unless --health-host says otherwise): what a
        # container probe can reach when the main port needs TLS client certificates or
        # tokens.
        health_server = grpc.aio.server(options=[_NO_REUSEPORT])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        if _bind(health_server, f"{config.health_host}:{config.health_port}") == 0:
            await server.stop(0)
            raise PortBindError(f"could not bind the health port {config.health_port}")
        await health_server.start()
    for name in ("", SERVICE_NAME, ADMIN_SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer, health_server


def start_server(config: ServerConfig, runtime: ModelRuntime | None = None) -> RunningServer:
    """Load the model (unless given), bind, and start serving.

    Args:
        config: the server configuration.
        runtime: an already loaded model (tests share one) of ``config.model_path``;
            default loads it (or the repository's defaults) on ``config.device``.

    Returns:
        The running server; its ``port`` is the bound port (``config.port`` may be 0).

    Raises:
        ModelArtifactError: the artifact (every version of a default model) cannot be
            loaded, or fails its warm-up batches (one of the first-batch size and one of
            ``config.batch_size``).
        TransportPolicyError: plaintext on a non-loopback host without ``allow_insecure``,
            or an unreadable TLS file.
        TokensFileError: the tokens file is unreadable or malformed.
        PortBindError: a port (main, health or metrics) cannot be bound (in use, or not
            allowed).
        CacheDirError: ``config.cache_dir`` cannot be created, written or renamed in.
    """
    check_transport_policy(config)
    credentials = server_credentials(config)
    tokens = TokenStore.load(config.tokens_file) if config.tokens_file is not None else None
    # Metrics only when served: without them every report goes to a no-op observer.
    metrics = ServerMetrics() if config.metrics_port else None
    observer = metrics if metrics is not None else NULL_OBSERVER
    # The cache directory is checked before the model loads: an unusable one stops the
    # start at once (CacheDirError).
    store = ResultCache(config.cache_dir, config.cache_max_bytes) if config.cache_dir else None
    preloaded = {config.model_path: runtime} if runtime and config.model_path else {}
    models = _repository(config, ModelBuilder(config, observer, store, preloaded))
    default = models.default_loaded()
    assert default is not None
    worker = default.parts.worker
    pools = _slot_pools(config)
    servicer = _build_servicer(config, models, pools)
    audit_log = AuditLog(config.audit_log)
    # Threads for blocking work: one per slot that can run some, and a few for
    # validation of calls that are then refused and for GetModelInfo-sized work.
    executor = futures.ThreadPoolExecutor(
        max_workers=sum(p.size for p in pools.values()) + 4, thread_name_prefix="call"
    )
    path = CallPath(
        Authenticator(tokens, anonymous_admin=config.allow_anonymous_admin),
        audit_log,
        pools,
        CallLimits(config.default_deadline_s, config.stalled_stream_s),
        executor,
        default.parts.label,
        observer,
        models,
    )
    if metrics is not None:
        metrics.watch_pools(pools, path.waiting)
        for loaded in models.loaded():
            metrics.set_model(loaded.parts.runtime, loaded.name, loaded.version)
    service = build_service(
        pb.DESCRIPTOR.services_by_name["SlideAnalysisService"], path, servicer.rpcs()
    )
    admin_service = build_service(
        admin_pb.DESCRIPTOR.services_by_name["ModelAdminService"],
        path,
        ModelAdminServicer(models).rpcs(),
    )
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True)
    loop_thread.start()
    try:
        if metrics is not None:
            _serve_metrics(metrics, config)
        server, port, health_servicer, health_server = asyncio.run_coroutine_threadsafe(
            _start_grpc(config, credentials, service, admin_service), loop
        ).result()
        for loaded in models.loaded():
            asyncio.run_coroutine_threadsafe(
                health_servicer.set(
                    model_health_name(loaded.name, loaded.version),
                    health_pb2.HealthCheckResponse.SERVING,
                ),
                loop,
            ).result()
    except BaseException:
        if metrics is not None:
            metrics.close()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join()
        loop.close()
        executor.shutdown()
        models.close()
        servicer.uploads.close()
        audit_log.close()
        raise
    log.info(
        "serving",
        extra={
            "port": port,
            "device": worker.runtime.device,
            "precision": worker.runtime.precision,
            "engine": worker.runtime.engine,
            "model_version": worker.runtime.manifest.model_version,
            "untrained": worker.runtime.manifest.untrained,
            "untrained_parts": list(worker.runtime.manifest.untrained_parts),
            "tls": "mutual" if config.tls_client_ca else ("server" if config.tls else "off"),
            "token_auth": tokens is not None,
        },
    )
    if worker.runtime.manifest.untrained:
        log.warning(
            "the model is %s (export with --weights / --mil-weights for trained parts)",
            untrained_warning(worker.runtime.manifest.untrained_parts),
            extra={"untrained_parts": list(worker.runtime.manifest.untrained_parts)},
        )
    models.on_change = _model_listener(loop, health_servicer, metrics)
    running = RunningServer(
        server,
        port,
        config,
        health_servicer,
        servicer,
        worker,
        servicer.uploads,
        audit_log,
        loop,
        loop_thread,
        executor,
        path,
        health_server,
        metrics,
        models,
    )
    if config.repository_poll_s > 0:
        running.start_polling(config.repository_poll_s)
    return running


def _model_listener(
    loop: asyncio.AbstractEventLoop,
    health_servicer: health.aio.HealthServicer,
    metrics: ServerMetrics | None,
) -> Callable[[str, str, ServedModel | None], None]:
    """Tell the health service (SERVING / NOT_SERVING per ``NAME:VERSION``) and the
    metrics (``model_info`` series) that a version loaded or unloaded."""

    def changed(name: str, version: str, served: ServedModel | None) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if served is not None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(
                health_servicer.set(model_health_name(name, version), status), loop
            )
        if metrics is not None:
            if served is not None:
                metrics.set_model(served.runtime, name, version)
            else:
                metrics.drop_model(name, version)

    return changed


def _serve_metrics(metrics: ServerMetrics, config: ServerConfig) -> None:
    """Serve ``metrics`` on ``--metrics-host``:``--metrics-port``.

    Raises:
        PortBindError: the port cannot be bound.
    """
    try:
        metrics.serve(config.metrics_host, config.metrics_port)
    except OSError:
        raise PortBindError(
            f"could not bind the metrics port {config.metrics_host}:{config.metrics_port}"
        ) from None


#: Loggers whose messages are this project's own (they never name a slide).
_OWN_LOGGERS = ("histohelper", "py.warnings.histohelper")


class PortBindError(RuntimeError):
    """The main or health port could not be bound (in use, or not allowed)."""


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and structured extras
    (request_id, port, ...). Slide names never reach it: callers log ids only. A line
    logged on a call's thread without a request_id (the tiler's, say) gets the call's.

    Messages of other libraries' loggers (tifffile, PIL, OpenSlide, grpc, ...) are
    withheld, keeping logger and level: tifffile, for one, quotes the file it reads,
    and slide file names may carry patient identifiers. Tracebacks keep their frames
    (file, line, function, source line) and exception types, but withhold the messages
    of exceptions from outside this project for the same reason.
    :class:`~histohelper.errors.HistoHelperError` messages never name a slide and are
    kept.
    """

    _STANDARD = frozenset(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        own = any(record.name == n or record.name.startswith(n + ".") for n in _OWN_LOGGERS)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage() if own else "<library message withheld>",
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        call = current_call()  # logged on a call's thread (the tiler knows no request ids)
        if "request_id" not in entry and call is not None and call.request_id:
            entry["request_id"] = call.request_id
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        """The exception chain, oldest first, messages withheld (see the class)."""
        exc = ei[1]
        chain: list[BaseException] = []
        while exc is not None and all(exc is not seen for seen in chain):
            chain.append(exc)
            exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        parts = []
        for e in reversed(chain):
            kind = f"{type(e).__module__}.{type(e).__qualname__}"
            message = str(e) if isinstance(e, HistoHelperError) else "<message withheld>"
            parts.append(
                "Traceback (most recent call last):\n"
                + "".join(traceback.format_tb(e.__traceback__))
                + f"{kind}: {message}"
            )
        return "\n\nDuring handling, or as the cause:\n".join(parts)


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """:func:`warnings.showwarning` for the server: a JSON log line, not raw stderr.

    Warnings raised by this project keep their text (logger
    ``py.warnings.histohelper``); a library's (PIL's "Corrupt EXIF data", ...) is
    logged by category and source file only (logger ``py.warnings``), since its text
    may quote a file name.
    """
    own = category.__module__.startswith("histohelper")
    logging.getLogger("py.warnings.histohelper" if own else "py.warnings").warning(
        "%s: %s",
        category.__name__,
        message,
        extra={"warning": category.__name__, "source": f"{Path(filename).name}:{lineno}"},
    )


def configure_logging(level: str = "INFO") -> None:
    """JSON-lines logs on stderr, Python warnings included; called only from ``main()``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    warnings.showwarning = _log_warning


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns an exit status.

    SIGTERM is handled from before the port opens: one sent as soon as the port answers
    (or the ready file appears) stops the server gracefully (exit 0) once it has
    started, instead of killing it. SIGINT (Ctrl-C) still interrupts a start-up at once.
    """
    stopping = threading.Event()
    started: list[RunningServer] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("shutdown requested", extra={"signal": signal.Signals(signum).name})
        # Set from another thread: this handler may run on the main thread while it
        # holds the event's lock on its way into stopping.wait().
        threading.Thread(target=stopping.set, name="shutdown-request", daemon=True).start()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        if not started:  # still starting: the repository is scanned at start anyway
            return
        log.info("model repository rescan requested", extra={"signal": "SIGHUP"})
        target = started[0].rescan
        threading.Thread(target=target, name="repository-rescan", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    running = start_server(config)
    started.append(running)
    signal.signal(signal.SIGINT, on_signal)
    if config.ready_file is not None:
        tmp = Path(f"{config.ready_file}.tmp")
        tmp.write_text(json.dumps({"host": config.host, "port": running.port, "pid": os.getpid()}))
        tmp.replace(config.ready_file)
    # The kernel may hand a SIGTERM to any thread (gRPC's, torch's); its Python handler
    # runs only once the main thread executes bytecode again, which a wait without a
    # timeout never does: the server then ignored the signal (seen under load). Wake
    # every 0.5 s to let a pending handler run.
    while not stopping.wait(0.5):
        pass
    running.stop()
    log.info("stopped")
    return 0
