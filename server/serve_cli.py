"""``histohelper serve``: run the gRPC analysis server.

Every flag has a ``HISTOHELPER_<NAME>`` environment variable (flags win), so a
container can be configured from its environment. Heavy imports (torch, OpenSlide)
happen only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from histohelper.server.config import ServerConfig, env_default


def _env_int(name: str, default: int) -> int:
    value = env_default(name)
    return int(value) if value is not None else default


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``serve`` on the top-level parser."""
    p = subparsers.add_parser(
        "serve",
        help="run the gRPC analysis server",
        description=(
            "Serve an exported model over gRPC (histohelper.v1.SlideAnalysisService, "
            "grpc.health.v1 and server reflection). Slides are read from paths relative to "
            "--slide-root. Logs are JSON lines on stderr with request ids, never slide names. "
            "SIGTERM stops accepting calls and lets in-flight analyses finish within --grace-s."
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
        choices=["auto", "fp32", "bf16", "fp16"],
        help="model precision; auto picks the fastest variant that passed the export's "
        "parity gate on this device [HISTOHELPER_PRECISION]",
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
        "--grace-s",
        type=float,
        default=float(env_default("GRACE_S", "10") or 10),
        help="seconds in-flight calls get after SIGTERM (default 10) [HISTOHELPER_GRACE_S]",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        default=env_default("READY_FILE"),
        help="write {host, port, pid} as JSON here once serving (for scripts using --port 0)",
    )
    p.add_argument(
        "--log-level",
        default=env_default("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO) [HISTOHELPER_LOG_LEVEL]",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the configuration from the parsed flags and serve until signalled."""
    from histohelper.server.app import configure_logging, serve

    configure_logging(args.log_level)
    slide_root = Path(args.slide_root)
    if not slide_root.is_dir():
        raise SystemExit("histohelper serve: --slide-root is not a directory")
    config = ServerConfig(
        model_path=Path(args.model),
        slide_root=slide_root,
        host=args.host,
        port=args.port,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        num_readers=args.readers,
        max_concurrent_analyses=args.max_concurrent,
        max_patches_per_slide=args.max_patches,
        num_threads=args.threads,
        grace_s=args.grace_s,
        ready_file=args.ready_file,
    )
    return serve(config)
