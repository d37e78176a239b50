"""``histohelper serve``: run the gRPC analysis server.

Every flag has a ``HISTOHELPER_<NAME>`` environment variable (flags win), so a
container can be configured from its environment. Heavy imports (torch, OpenSlide)
happen only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from histohelper.server.config import MIB, ServerConfig, env_default


def _env_int(name: str, default: int) -> int:
    value = env_default(name)
    return int(value) if value is not None else default


def _env_float(name: str, default: float) -> float:
    value = env_default(name)
    return float(value) if value is not None else default


def _env_flag(name: str) -> bool:
    return (env_default(name) or "").strip().lower() in {"1", "true", "yes", "on"}


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    """TLS, authentication, uploads, limits and audit flags (see README "Security notes")."""
    g = p.add_argument_group("transport security and authentication")
    g.add_argument(
        "--tls-cert",
        type=Path,
        default=env_default("TLS_CERT"),
        help="PEM certificate chain of the server; with --tls-key the port speaks TLS only "
        "[HISTOHELPER_TLS_CERT]",
    )
    g.add_argument(
        "--tls-key",
        type=Path,
        default=env_default("TLS_KEY"),
        help="PEM private key of the server [HISTOHELPER_TLS_KEY]",
    )
    g.add_argument(
        "--tls-client-ca",
        type=Path,
        default=env_default("TLS_CLIENT_CA"),
        help="PEM CA bundle: clients must present a certificate it signed (mutual TLS) "
        "[HISTOHELPER_TLS_CLIENT_CA]",
    )
    g.add_argument(
        "--tokens-file",
        type=Path,
        default=env_default("TOKENS_FILE"),
        help="JSON file of accepted bearer-token SHA-256 hashes with identities and roles; "
        "when set every call but health/reflection needs 'authorization: Bearer <token>' "
        "[HISTOHELPER_TOKENS_FILE]",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=_env_flag("INSECURE"),
        help="allow plaintext on a non-loopback --host (e.g. behind a TLS sidecar); "
        "plaintext is otherwise served only on loopback [HISTOHELPER_INSECURE=1]",
    )
    g.add_argument(
        "--audit-log",
        type=Path,
        default=env_default("AUDIT_LOG"),
        help="append JSON-lines audit records here (default: the histohelper.audit logger "
        "on stderr) [HISTOHELPER_AUDIT_LOG]",
    )
    u = p.add_argument_group("uploads")
    u.add_argument(
        "--upload-dir",
        type=Path,
        default=env_default("UPLOAD_DIR"),
        help="upload area (default: a private temporary directory) [HISTOHELPER_UPLOAD_DIR]",
    )
    u.add_argument(
        "--upload-max-mib",
        type=float,
        default=_env_float("UPLOAD_MAX_MIB", 4096),
        help="largest single upload in MiB (default 4096) [HISTOHELPER_UPLOAD_MAX_MIB]",
    )
    u.add_argument(
        "--upload-quota-mib",
        type=float,
        default=_env_float("UPLOAD_QUOTA_MIB", 16384),
        help="all stored and in-flight uploads together, MiB (default 16384) "
        "[HISTOHELPER_UPLOAD_QUOTA_MIB]",
    )
    u.add_argument(
        "--upload-ttl-s",
        type=float,
        default=_env_float("UPLOAD_TTL_S", 3600),
        help="seconds an upload lives after its last use (default 3600) [HISTOHELPER_UPLOAD_TTL_S]",
    )
    u.add_argument(
        "--max-concurrent-uploads",
        type=int,
        default=_env_int("MAX_CONCURRENT_UPLOADS", 4),
        help="UploadSlide calls in flight (default 4) [HISTOHELPER_MAX_CONCURRENT_UPLOADS]",
    )
    lim = p.add_argument_group("limits")
    lim.add_argument(
        "--max-connection-age-s",
        type=float,
        default=_env_float("MAX_CONNECTION_AGE_S", 7200),
        help="connections get GOAWAY after this long and their calls as long again to "
        "finish; frees threads held by clients that stop sending without closing; 0 "
        "disables (default 7200) [HISTOHELPER_MAX_CONNECTION_AGE_S]",
    )
    lim.add_argument(
        "--max-classify-streams",
        type=int,
        default=_env_int("MAX_CLASSIFY_STREAMS", 4),
        help="ClassifyPatches streams open at once; one more is refused with "
        "RESOURCE_EXHAUSTED (default 4) [HISTOHELPER_MAX_CLASSIFY_STREAMS]",
    )
    lim.add_argument(
        "--max-reflection-streams",
        type=int,
        default=_env_int("MAX_REFLECTION_STREAMS", 2),
        help="server-reflection streams open at once (default 2) "
        "[HISTOHELPER_MAX_REFLECTION_STREAMS]",
    )
    lim.add_argument(
        "--default-deadline-s",
        type=float,
        default=_env_float("DEFAULT_DEADLINE_S", 3600),
        help="deadline of analyses and uploads whose client set none; 0 disables "
        "(default 3600) [HISTOHELPER_DEFAULT_DEADLINE_S]",
    )
    lim.add_argument(
        "--max-images-per-request",
        type=int,
        default=_env_int("MAX_IMAGES_PER_REQUEST", 1024),
        help="images per ClassifyPatches request (default 1024) "
        "[HISTOHELPER_MAX_IMAGES_PER_REQUEST]",
    )
    lim.add_argument(
        "--max-message-mib",
        type=float,
        default=_env_float("MAX_MESSAGE_MIB", 16),
        help="largest gRPC message either way, MiB (default 16) [HISTOHELPER_MAX_MESSAGE_MIB]",
    )
    lim.add_argument(
        "--keepalive-time-s",
        type=float,
        default=_env_float("KEEPALIVE_TIME_S", 60),
        help="HTTP/2 keepalive ping interval (default 60) [HISTOHELPER_KEEPALIVE_TIME_S]",
    )
    lim.add_argument(
        "--keepalive-timeout-s",
        type=float,
        default=_env_float("KEEPALIVE_TIMEOUT_S", 20),
        help="drop a connection whose ping is not acknowledged within this (default 20) "
        "[HISTOHELPER_KEEPALIVE_TIMEOUT_S]",
    )


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``serve`` on the top-level parser."""
    p = subparsers.add_parser(
        "serve",
        help="run the gRPC analysis server",
        description=(
            "Serve an exported model over gRPC (histohelper.v1.SlideAnalysisService, "
            "grpc.health.v1 and server reflection). Slides are read from paths relative to "
            "--slide-root. Logs are JSON lines on stderr with request ids, never slide names. "
            "SIGTERM flips health to NOT_SERVING, keeps accepting calls for --drain-s, then "
            "stops accepting and lets in-flight analyses finish within --grace-s."
        ),
    )
    p.add_argument(
        "--model",
        type=Path,
        default=env_default("MODEL"),
        required=env_default("MODEL") is None,
        help="exported TorchScript artifact (histohelper export) [HISTOHELPER_MODEL]",
    )
    p.add_argument(
        "--slide-root",
        type=Path,
        default=env_default("SLIDE_ROOT"),
        required=env_default("SLIDE_ROOT") is None,
        help="directory that request slide paths are relative to; nothing outside it is "
        "readable [HISTOHELPER_SLIDE_ROOT]",
    )
    p.add_argument(
        "--host",
        default=env_default("HOST", "127.0.0.1"),
        help="interface to bind (default 127.0.0.1; 0.0.0.0 in containers) [HISTOHELPER_HOST]",
    )
    p.add_argument(
        "--port",
        type=int,
        default=_env_int("PORT", 50051),
        help="TCP port, 0 for any free one (default 50051) [HISTOHELPER_PORT]",
    )
    p.add_argument(
        "--device",
        default=env_default("DEVICE", "auto"),
        help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps [HISTOHELPER_DEVICE]",
    )
    p.add_argument(
        "--precision",
        default=env_default("PRECISION", "auto"),
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="model precision; auto picks the fastest variant that passed the export's "
        "parity gate on this device (int8: ONNX backends only) [HISTOHELPER_PRECISION]",
    )
    p.add_argument(
        "--backend",
        default=env_default("BACKEND", "auto"),
        choices=["auto", "torchscript", "onnx", "openvino"],
        help="model runtime (onnx: ONNX Runtime); auto serves the artifact's int8 ONNX "
        "model on CPUs with VNNI when it passed its gate (measured faster), with OpenVINO "
        "where installed and gated, else ONNX Runtime; otherwise TorchScript "
        "[HISTOHELPER_BACKEND]",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=_env_int("BATCH_SIZE", 32),
        help="default patches per model batch (default 32) [HISTOHELPER_BATCH_SIZE]",
    )
    p.add_argument(
        "--readers",
        type=int,
        default=_env_int("READERS", 2),
        help="slide-reader threads per analysis (default 2) [HISTOHELPER_READERS]",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=_env_int("MAX_CONCURRENT", 2),
        help="analyses in flight; one more gets RESOURCE_EXHAUSTED (default 2) "
        "[HISTOHELPER_MAX_CONCURRENT]",
    )
    p.add_argument(
        "--max-patches",
        type=int,
        default=_env_int("MAX_PATCHES", 1_000_000),
        help="refuse slides with more tissue patches than this [HISTOHELPER_MAX_PATCHES]",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=_env_int("THREADS", 0) or None,
        help="torch intra-op threads (default: the runtime's choice) [HISTOHELPER_THREADS]",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=float(env_default("DRAIN_S", "0") or 0),
        help="seconds after SIGTERM during which health says NOT_SERVING but new calls are "
        "still accepted, so load balancers move traffic first (default 0) "
        "[HISTOHELPER_DRAIN_S]",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=float(env_default("GRACE_S", "10") or 10),
        help="seconds in-flight calls get after SIGTERM (default 10) [HISTOHELPER_GRACE_S]",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        default=env_default("READY_FILE"),
        help="write {host, port, pid} as JSON here once serving (for scripts using --port 0) "
        "[HISTOHELPER_READY_FILE]",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=_env_int("HEALTH_PORT", 0) or None,
        help="also serve grpc.health.v1 alone, in plaintext, on 127.0.0.1:PORT, for container "
        "probes when the main port needs TLS or tokens (default: off) [HISTOHELPER_HEALTH_PORT]",
    )
    p.add_argument(
        "--log-level",
        default=env_default("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO) [HISTOHELPER_LOG_LEVEL]",
    )
    _add_security_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the configuration from the parsed flags and serve until signalled."""
    from histohelper.errors import ModelArtifactError
    from histohelper.server.app import PortBindError, configure_logging, serve
    from histohelper.server.auth import TokensFileError, TokenStore
    from histohelper.server.tls import TransportPolicyError, check_transport_policy

    configure_logging(args.log_level)
    slide_root = Path(args.slide_root)
    if not slide_root.is_dir():
        raise SystemExit("histohelper serve: --slide-root is not a directory")
    try:
        config = _config(args, slide_root)
        check_transport_policy(config)
        if config.tokens_file is not None:
            TokenStore.load(config.tokens_file)
    except (ValueError, TransportPolicyError, TokensFileError) as exc:
        raise SystemExit(f"histohelper serve: {exc}") from None
    try:
        code = serve(config)
    except (ModelArtifactError, PortBindError) as exc:  # our messages: no path, no slide
        raise SystemExit(f"histohelper serve: {exc}") from None
    # Everything is stopped, flushed and closed by now. Leave without running native
    # libraries' exit-time destructors: one of them (gRPC, OpenCV or torch thread
    # pools) rarely aborted the process after a clean shutdown ("terminate called
    # without an active exception", exit -6), which an orchestrator reads as a crash.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _config(args: argparse.Namespace, slide_root: Path) -> ServerConfig:
    return ServerConfig(
        model_path=Path(args.model),
        slide_root=slide_root,
        host=args.host,
        port=args.port,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        batch_size=args.batch_size,
        num_readers=args.readers,
        max_concurrent_analyses=args.max_concurrent,
        max_patches_per_slide=args.max_patches,
        num_threads=args.threads,
        drain_s=args.drain_s,
        grace_s=args.grace_s,
        ready_file=args.ready_file,
        health_port=args.health_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        tokens_file=args.tokens_file,
        allow_insecure=args.insecure,
        audit_log=args.audit_log,
        upload_dir=args.upload_dir,
        upload_max_bytes=int(args.upload_max_mib * MIB),
        upload_quota_bytes=int(args.upload_quota_mib * MIB),
        upload_ttl_s=args.upload_ttl_s,
        max_concurrent_uploads=args.max_concurrent_uploads,
        max_classify_streams=args.max_classify_streams,
        max_connection_age_s=args.max_connection_age_s,
        max_reflection_streams=args.max_reflection_streams,
        default_deadline_s=args.default_deadline_s,
        max_images_per_request=args.max_images_per_request,
        max_message_bytes=int(args.max_message_mib * MIB),
        keepalive_time_s=args.keepalive_time_s,
        keepalive_timeout_s=args.keepalive_timeout_s,
    )
