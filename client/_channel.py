"""Channel construction shared by the sync and asyncio clients: target, load balancing,
options, TLS, auth.

Load balancing (:func:`resolve_target`): a list of addresses, a comma-separated string
of them, or a ``dns:``/``ipv4:``/``ipv6:`` target gets gRPC's ``round_robin`` policy
(each call goes to the next ready server; servers whose health says NOT_SERVING, e.g.
draining ones, are skipped), chosen in the service config (``loadBalancingConfig``). A
single plain ``host:port`` keeps gRPC's default ``pick_first`` (one connection).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

SERVICE_NAME = "histohelper.v1.SlideAnalysisService"

#: RPCs retried on UNAVAILABLE by gRPC: those that change nothing on the server.
#: ``UploadSlide`` is left out: each call stores a copy, so a retry after a lost
#: response would store the slide twice (calls that never reached a server are retried
#: by gRPC transparently anyway).
IDEMPOTENT_METHODS = ("AnalyzeSlide", "GetModelInfo", "ClassifyPatches", "ExplainPatches")

#: URI schemes of gRPC targets that may name several servers.
_MULTI_SCHEMES = ("dns:", "ipv4:", "ipv6:")
#: Target URI schemes passed to gRPC as they are (never split at commas).
_URI_SCHEMES = (*_MULTI_SCHEMES, "unix:", "unix-abstract:", "vsock:", "xds:")


def resolve_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target string for ``target`` and whether calls are spread (round_robin).

    Args:
        target: ``"host:port"`` (one server, ``pick_first``); a gRPC target URI with
            scheme ``dns:`` (e.g. ``"dns:///histohelper-headless:50051"``: every address
            the name resolves to), ``ipv4:`` or ``ipv6:``; or several IP addresses, as a
            sequence or one comma-separated string: ``["127.0.0.1:5001",
            "127.0.0.1:5002"]`` -> ``"ipv4:127.0.0.1:5001,127.0.0.1:5002"``, ``["[::1]:5001",
            "[::1]:5002"]`` -> ``"ipv6:[::1]:5001,[::1]:5002"``.

    Returns:
        ``(grpc_target, round_robin)``.

    Raises:
        ValueError: an empty list, an address without a port, a mix of IPv4 and IPv6, or
            host names in a list (gRPC resolves one name per channel: give one DNS name
            that resolves to every replica, ``dns:///NAME:PORT``).
    """
    if isinstance(target, str) and target.strip().lower().startswith(_URI_SCHEMES):
        uri = target.strip()
        return uri, uri.lower().startswith(_MULTI_SCHEMES)
    parts = [target] if isinstance(target, str) else list(target)
    parts = [p.strip() for item in parts for p in item.split(",") if p.strip()]
    if not parts:
        raise ValueError("no server address given")
    if len(parts) == 1:
        return parts[0], parts[0].lower().startswith(_MULTI_SCHEMES)
    families = {_ip_family(p) for p in parts}
    if families == {4}:
        return "ipv4:" + ",".join(parts), True
    if families == {6}:
        return "ipv6:" + ",".join(parts), True
    raise ValueError(
        "a list of servers must be IP addresses of one family with ports (gRPC's ipv4:/ipv6: "
        f"targets), got {parts}; for host names give one DNS name that resolves to every "
        "server: dns:///NAME:PORT"
    )


def _ip_family(address: str) -> int | None:
    """4 or 6 for ``IP:PORT`` / ``[IPv6]:PORT``; ``None`` for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


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

    def method_config(self) -> dict[str, Any]:
        """The ``methodConfig`` entry: :data:`IDEMPOTENT_METHODS` retried on UNAVAILABLE."""
        return {
            "name": [{"service": SERVICE_NAME, "method": m} for m in IDEMPOTENT_METHODS],
            "retryPolicy": {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s:.3f}s",
                "maxBackoff": f"{self.max_backoff_s:.3f}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }

    def service_config(self) -> str:
        """The service config JSON for channel option ``grpc.service_config``."""
        return service_config(self, round_robin=False)


def service_config(retry: RetryPolicy | None, *, round_robin: bool) -> str:
    """Service config JSON: retries (if any) and, with ``round_robin``, the policy and
    client-side health checking (a server whose ``grpc.health.v1`` says NOT_SERVING,
    e.g. a draining one, gets no new calls; one without the health service counts as
    healthy)."""
    config: dict[str, Any] = {}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": ""}
    if retry is not None:
        config["methodConfig"] = [retry.method_config()]
    return json.dumps(config)


def channel_options(
    retry: RetryPolicy | None,
    max_receive_message_bytes: int,
    extra: tuple[tuple[str, Any], ...] = (),
    *,
    round_robin: bool = False,
) -> list[tuple[str, Any]]:
    """Channel options: message size limit, service config (retries, load balancing),
    then ``extra``."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", int(max_receive_message_bytes)),
        ("grpc.enable_retries", 1 if retry is not None else 0),
    ]
    if retry is not None or round_robin:
        opts.append(("grpc.service_config", service_config(retry, round_robin=round_robin)))
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
