"""Map gRPC failures back to the HistoHelper error family (:mod:`histohelper.errors`).

The server sends a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer with
a ``google.rpc.ErrorInfo`` detail (domain ``histohelper.v1``); its ``reason`` picks the
class. Without one (transport errors, other servers), the status code does.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from histohelper.errors import ERROR_DOMAIN, HistoHelperError, error_class_for

_DETAILS_KEY = "grpc-status-details-bin"

# Context for codes whose transport-level details say little on their own.
_PREFIX = {
    "UNAVAILABLE": "server unavailable",
    "DEADLINE_EXCEEDED": "deadline exceeded",
    "CANCELLED": "call cancelled",
    "UNKNOWN": "server failed with an unmapped error (UNKNOWN)",
    "UNIMPLEMENTED": "the server does not implement this call",
}


def _status_from_trailers(err: grpc.RpcError) -> status_pb2.Status | None:
    trailing = getattr(err, "trailing_metadata", None)
    if trailing is None:
        return None
    try:
        pairs = trailing() or ()
        for key, value in pairs:
            if key == _DETAILS_KEY:
                status = status_pb2.Status()
                status.ParseFromString(value)
                return status
    except Exception:  # malformed trailers: fall back to the status code
        return None
    return None


def _error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo | None:
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                return info
    return None


def error_from_rpc(err: grpc.RpcError) -> HistoHelperError:
    """Convert a failed call (sync or ``grpc.aio``) to the matching HistoHelper error.

    Args:
        err: the ``grpc.RpcError`` (also ``grpc.aio.AioRpcError``) raised by a call.

    Returns:
        An instance of the class :func:`histohelper.errors.error_class_for` picks from the
        ``ErrorInfo`` reason, else from the status code; its ``metadata`` holds the
        ErrorInfo metadata (e.g. a request id).
    """
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    code_name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    status = _status_from_trailers(err)
    info = _error_info(status)
    message = (status.message if status is not None and status.message else details) or code_name
    if info is None and code_name in _PREFIX:
        message = f"{_PREFIX[code_name]}: {message}"
    cls = error_class_for(info.reason if info is not None else None, code_name)
    return cls(message, **(dict(info.metadata) if info is not None else {}))
