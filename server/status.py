"""Map HistoHelper errors to gRPC statuses with rich details (google.rpc.Status).

Each :class:`~histohelper.errors.HistoHelperError` carries a fixed gRPC code and a
reason; this module turns it into a status whose details hold one
``google.rpc.ErrorInfo`` (domain ``histohelper.v1``), which the client maps back to
the same class. Anything else becomes INTERNAL carrying only a request id.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from histohelper.errors import ERROR_DOMAIN, HistoHelperError


def to_grpc_status(error: HistoHelperError, request_id: str | None = None) -> grpc.Status:
    """Build the ``grpc.Status`` (with ErrorInfo detail) for ``error``.

    Args:
        error: the domain error; its ``message`` must already be safe to send.
        request_id: added to the ErrorInfo metadata when given.

    Returns:
        A status for ``context.abort_with_status``.
    """
    metadata = dict(error.metadata)
    if request_id:
        metadata["request_id"] = request_id
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code = getattr(code_pb2, error.code)
    status = rpc_status.to_status(
        status_pb2.Status(code=code, message=error.message, details=[detail])
    )
    if "retry_after_s" in metadata:
        # An error with its own retry hint (PACS_UNAVAILABLE) is not for gRPC's silent
        # transport retries, which would ignore the hint: a negative
        # grpc-retry-pushback-ms (gRFC A6) tells the client's channel not to retry it;
        # the caller retries it visibly, after at least retry_after_s.
        trailing = (*status.trailing_metadata, (PUSHBACK_KEY, "-1"))
        return status._replace(trailing_metadata=trailing)
    return status


#: Trailing metadata by which a server steers gRPC client retries (gRFC A6).
PUSHBACK_KEY = "grpc-retry-pushback-ms"
