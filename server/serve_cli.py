"""``histohelper serve``: run the gRPC analysis server.

Its flags are generated from the settings declared on
:class:`~histohelper.server.config.ServerConfig`: each has a ``HISTOHELPER_<NAME>``
environment variable (flags win), so a container can be configured from its
environment. Heavy imports (torch, OpenSlide) happen only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from histohelper.server import config as server_config

log = logging.getLogger(__name__)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the top-level parser (reads no environment)."""
    p = subparsers.add_parser(
        "serve",
        help="run the gRPC analysis server",
        description=(
            "Serve an exported model over gRPC (histohelper.v1.SlideAnalysisService, "
            "grpc.health.v1 and server reflection). Slides are read from paths relative to "
            "--slide-root. Logs are JSON lines on stderr with request ids, never slide names. "
            "SIGTERM flips health to NOT_SERVING, keeps accepting calls for --drain-s, then "
            "stops accepting and lets in-flight analyses finish within --grace-s. Every flag "
            "has the environment variable shown beside it; flags win."
        ),
    )
    server_config.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the configuration from the parsed flags and serve until signalled."""
    try:  # first, so that a bad setting stops the command before anything heavy loads
        config, deprecated = server_config.config_from(args, os.environ)
    except ValueError as exc:
        raise SystemExit(f"histohelper serve: {exc}") from None
    if config.dicomweb or config.dicomweb_secrets_dir is not None:
        from histohelper.server.dicomweb import parse_endpoints  # messages name no secret

        try:
            parse_endpoints(config.dicomweb, config.dicomweb_secrets_dir, config.dicomweb_timeout_s)
        except ValueError as exc:
            raise SystemExit(f"histohelper serve: {exc}") from None
    from histohelper.errors import ModelArtifactError
    from histohelper.server.app import PortBindError, configure_logging, serve
    from histohelper.server.auth import TokensFileError, TokenStore
    from histohelper.server.cache import CacheDirError
    from histohelper.server.tls import TransportPolicyError, check_transport_policy

    configure_logging(config.log_level)
    for change in deprecated:
        log.warning("deprecated setting name, removed in the next release: %s", change)
    if not config.slide_root.is_dir():
        raise SystemExit("histohelper serve: --slide-root is not a directory")
    try:
        check_transport_policy(config)
        if config.tokens_file is not None:
            TokenStore.load(config.tokens_file)
    except (TransportPolicyError, TokensFileError) as exc:
        raise SystemExit(f"histohelper serve: {exc}") from None
    if config.stain_reference is not None:  # fitted once here; an unusable one stops serve
        from histohelper.errors import InvalidOptionsError
        from histohelper.server.tiling.stain import StainFitError, reference_file_targets

        try:
            reference_file_targets(str(config.stain_reference))
        except (InvalidOptionsError, StainFitError) as exc:
            raise SystemExit(f"histohelper serve: --stain-reference: {exc}") from None
    if config.model_repository is not None and not config.model_repository.is_dir():
        raise SystemExit(
            f"histohelper serve: model repository not found: {config.model_repository} "
            f"(looked for {config.model_repository.resolve()}; --model-repository)"
        )
    if config.model_path is not None and not config.model_path.is_file():
        raise SystemExit(
            f"histohelper serve: model artifact not found: {config.model_path} (looked for "
            f"{config.model_path.resolve()}; --model / HISTOHELPER_MODEL; "
            "make one with: histohelper export PATH)"
        )
    try:
        code = serve(config)
    except (ModelArtifactError, PortBindError, CacheDirError) as exc:  # no slide named
        raise SystemExit(f"histohelper serve: {exc}") from None
    # Everything is stopped, flushed and closed by now. Leave without running native
    # libraries' exit-time destructors: one of them (gRPC, OpenCV or torch thread
    # pools) rarely aborted the process after a clean shutdown ("terminate called
    # without an active exception", exit -6), which an orchestrator reads as a crash.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
