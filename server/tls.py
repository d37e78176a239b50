"""Transport security: TLS / mutual-TLS server credentials and the plaintext policy.

Policy: the port speaks TLS when ``tls_cert``/``tls_key`` are configured; with
``tls_client_ca`` it also requires a client certificate signed by that CA (mutual
TLS) and the handshake fails for clients without one. Plaintext is served only on a
loopback address (127.0.0.0/8, ::1, ``localhost``: the demo and tests) or when
``allow_insecure`` says so explicitly (e.g. behind a TLS-terminating sidecar).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from histohelper.server.config import ServerConfig


class TransportPolicyError(ValueError):
    """The configuration would serve plaintext where it is not allowed, or a TLS file
    is missing or unreadable."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.1``, ``[::1]``)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_transport_policy(config: ServerConfig) -> None:
    """Refuse plaintext on a non-loopback host unless ``allow_insecure`` is set, and
    ``allow_anonymous_admin`` on any non-loopback host (a development server only).

    Raises:
        TransportPolicyError: plaintext on a reachable interface without the opt-in, or
            anonymous admin calls on a reachable interface.
    """
    if config.allow_anonymous_admin and not is_loopback(config.host):
        raise TransportPolicyError(
            f"refusing --allow-anonymous-admin on {config.host}: it is for a loopback "
            "development server only; bind a loopback address, or give admins tokens "
            "(--tokens-file) instead"
        )
    if config.tls or config.allow_insecure or is_loopback(config.host):
        return
    raise TransportPolicyError(
        f"refusing to serve plaintext on {config.host}: configure --tls-cert/--tls-key "
        "(and --tls-client-ca for mutual TLS), bind a loopback address, or pass --allow-insecure"
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TransportPolicyError(f"cannot read {what} ({exc.strerror})") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, or None for plaintext.

    Returns:
        ``grpc.ssl_server_credentials`` with ``require_client_auth`` exactly when
        ``tls_client_ca`` is set (mutual TLS).

    Raises:
        TransportPolicyError: a configured file cannot be read.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    chain = _read(config.tls_cert, "the TLS certificate")
    key = _read(config.tls_key, "the TLS private key")
    client_ca = (
        _read(config.tls_client_ca, "the client CA bundle")
        if config.tls_client_ca is not None
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
