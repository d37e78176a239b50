"""Channel construction shared by the sync and asyncio clients: options, TLS, auth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

SERVICE_NAME = "histohelper.v1.SlideAnalysisService"

#: Largest response the client accepts; the server streams in chunks far below it.
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC client-side retries of calls that fail with UNAVAILABLE, with backoff.

    Expressed as a gRPC service config (``retryPolicy``); gRPC caps ``max_attempts``
    at 5. A streaming call is retried only until its first response arrives.

    Attributes:
        max_attempts: total attempts including the first, in [2, 5].
        initial_backoff_s: first backoff ceiling in seconds (jittered by gRPC).
        max_backoff_s: largest backoff in seconds.
        backoff_multiplier: growth factor per attempt.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be in [2, 5], got {self.max_attempts}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0:
            raise ValueError("backoffs must be positive")
        if self.backoff_multiplier <= 0:
            raise ValueError("backoff_multiplier must be positive")

    def service_config(self) -> str:
        """The service config JSON for channel option ``grpc.service_config``."""
        return json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": SERVICE_NAME}],
                        "retryPolicy": {
                            "maxAttempts": self.max_attempts,
                            "initialBackoff": f"{self.initial_backoff_s:.3f}s",
                            "maxBackoff": f"{self.max_backoff_s:.3f}s",
                            "backoffMultiplier": self.backoff_multiplier,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ]
            }
        )


def channel_options(
    retry: RetryPolicy | None,
    max_receive_message_bytes: int,
    extra: tuple[tuple[str, Any], ...] = (),
) -> list[tuple[str, Any]]:
    """Channel options: message size limit, retries (service config), then ``extra``."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", int(max_receive_message_bytes)),
    ]
    if retry is not None:
        opts += [("grpc.enable_retries", 1), ("grpc.service_config", retry.service_config())]
    else:
        opts += [("grpc.enable_retries", 0)]
    opts += list(extra)
    return opts


def channel_credentials(
    *,
    tls: bool | None,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    credentials: grpc.ChannelCredentials | None,
    token: str | None,
) -> grpc.ChannelCredentials | None:
    """Credentials for a secure channel, or ``None`` for an insecure one.

    ``tls=None`` means TLS exactly when certificates or ``credentials`` are given. With
    TLS, a ``token`` travels as ``authorization: Bearer <token>`` call credentials; on an
    insecure channel it is sent as plain call metadata instead (see :func:`call_metadata`).

    Raises:
        ValueError: ``tls=False`` together with certificates or credentials.
    """
    has_material = any(
        v is not None for v in (root_certificates, private_key, certificate_chain, credentials)
    )
    use_tls = has_material if tls is None else tls
    if not use_tls:
        if has_material:
            raise ValueError("tls=False but certificates or credentials were given")
        return None
    creds = credentials or grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def call_metadata(token: str | None, secure: bool) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the bearer token on insecure channels (TLS sends it itself)."""
    if token and not secure:
        return (("authorization", f"Bearer {token}"),)
    return ()
