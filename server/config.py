"""Server configuration: one frozen dataclass, built only in ``main()``.

Values come from CLI flags, then ``HISTOHELPER_*`` environment variables, then the
defaults below. Nothing is read at import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to run.

    Attributes:
        model_path: exported TorchScript artifact (``histohelper export``).
        slide_root: directory under which request slide paths are resolved (sandbox).
        host: interface to bind; loopback by default.
        port: TCP port; 0 picks a free one (written to ``ready_file``).
        device: "auto" (cuda -> mps -> cpu), "cpu", "cuda", "cuda:N" or "mps".
        precision: "auto", "fp32", "bf16", "fp16" or "int8" (auto: fastest variant that
            passed the export's parity gate on this device).
        backend: "auto" (the int8 ONNX model where the artifact has it and the CPU
            has VNNI, run by OpenVINO where installed and gated, else ONNX Runtime;
            else TorchScript), "torchscript", "onnx" (ONNX Runtime) or "openvino".
        batch_size: default patches per model batch.
        num_readers: slide-reader threads per analysis.
        max_concurrent_analyses: AnalyzeSlide calls in flight; one more gets
            RESOURCE_EXHAUSTED at once.
        max_patches_per_slide: larger grids are refused (RESOURCE_EXHAUSTED).
        max_message_bytes: gRPC send/receive limit per message, both directions.
        drain_s: on SIGTERM, seconds health reports NOT_SERVING while new calls are
            still accepted, so load balancers and readiness probes turn traffic away
            before the port closes (default 0: close at once).
        grace_s: on SIGTERM, after ``drain_s``, seconds in-flight calls get to finish
            before cancellation.
        num_threads: torch intra-op threads (None: the runtime's choice).
        ready_file: if set, JSON ``{"host", "port"}`` is written there once serving.
        max_failed_fraction: share of patches that may fail to read before the slide
            fails with DATA_LOSS.
        tls_cert, tls_key: PEM certificate chain and private key of the server; both or
            neither. With them the port speaks TLS only.
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it
            signed (mutual TLS) and its subject CN becomes the caller identity.
        tokens_file: JSON file of accepted bearer tokens, stored as SHA-256 hashes with a
            caller identity and roles (see ``histohelper.server.auth``); when set, every
            call but health and reflection needs ``authorization: Bearer <token>``.
        allow_insecure: serve plaintext on a non-loopback host (refused otherwise).
        upload_dir: upload area; None: a private temporary directory, removed on stop.
        upload_max_bytes: largest single upload (SLIDE_TOO_LARGE beyond it).
        upload_quota_bytes: bytes all stored and in-flight uploads may take together.
        upload_ttl_s: seconds an upload lives after its last use.
        max_concurrent_uploads: UploadSlide calls in flight.
        max_classify_streams: ClassifyPatches streams open at once; one more gets
            RESOURCE_EXHAUSTED at once (each open stream holds a server thread).
        max_reflection_streams: server-reflection streams open at once, likewise.
        default_deadline_s: deadline of AnalyzeSlide and UploadSlide calls whose client
            set none (DEADLINE_EXCEEDED after it); 0 disables.
        max_images_per_request: images per ClassifyPatches request.
        keepalive_time_s, keepalive_timeout_s: HTTP/2 keepalive ping interval and how long
            to wait for its ack before dropping the connection.
        max_connection_age_s: a connection gets GOAWAY after this long (clients
            reconnect by themselves), and its calls then get as long again to finish
            before they are cancelled. This is what frees the thread of a call whose
            client stopped sending without closing (the sync gRPC server cannot time
            out a wait for the next message); 0 disables.
        audit_log: JSON-lines audit file (appended, mode 0600); None: the
            ``histohelper.audit`` logger.
        health_port: if set, a second, plaintext port on 127.0.0.1 serving only
            ``grpc.health.v1`` (for container probes when the main port speaks TLS).
    """

    model_path: Path
    slide_root: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    batch_size: int = 32
    num_readers: int = 2
    max_concurrent_analyses: int = 2
    max_patches_per_slide: int = 1_000_000
    max_message_bytes: int = 16 * MIB
    drain_s: float = 0.0
    grace_s: float = 10.0
    num_threads: int | None = None
    ready_file: Path | None = None
    max_failed_fraction: float = 0.05
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tokens_file: Path | None = None
    allow_insecure: bool = False
    upload_dir: Path | None = None
    upload_max_bytes: int = 4 * GIB
    upload_quota_bytes: int = 16 * GIB
    upload_ttl_s: float = 3600.0
    max_concurrent_uploads: int = 4
    max_classify_streams: int = 4
    max_reflection_streams: int = 2
    default_deadline_s: float = 3600.0
    max_images_per_request: int = 1024
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_connection_age_s: float = 7200.0
    audit_log: Path | None = None
    health_port: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.num_readers < 1:
            raise ValueError("num_readers must be >= 1")
        if self.max_concurrent_analyses < 1:
            raise ValueError("max_concurrent_analyses must be >= 1")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ValueError("max_failed_fraction must be in [0, 1]")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if not 0 < self.upload_max_bytes <= self.upload_quota_bytes:
            raise ValueError("need 0 < upload_max_bytes <= upload_quota_bytes")
        if self.max_classify_streams < 1 or self.max_reflection_streams < 1:
            raise ValueError("max_classify_streams and max_reflection_streams must be >= 1")
        if self.upload_ttl_s <= 0 or self.max_concurrent_uploads < 1:
            raise ValueError("upload_ttl_s must be > 0 and max_concurrent_uploads >= 1")
        if self.default_deadline_s < 0:
            raise ValueError("default_deadline_s must be >= 0 (0 disables)")
        if self.max_images_per_request < 1:
            raise ValueError("max_images_per_request must be >= 1")
        if self.drain_s < 0 or self.grace_s < 0:
            raise ValueError("drain_s and grace_s must be >= 0")
        if self.max_connection_age_s < 0:
            raise ValueError("max_connection_age_s must be >= 0 (0 disables)")
        if self.keepalive_time_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ValueError("keepalive times must be > 0")

    @property
    def tls(self) -> bool:
        """True when the port speaks TLS."""
        return self.tls_cert is not None


def env_default(name: str, default: str | None = None) -> str | None:
    """Return ``HISTOHELPER_<NAME>`` from the environment, else ``default``."""
    return os.environ.get(f"HISTOHELPER_{name.upper()}", default)
