"""Server-side limits: a default deadline for calls whose client set none, and a cap
on open request streams.

A call without a client deadline could otherwise hold an analysis slot (or an upload
slot) forever. :class:`DefaultDeadline` starts a timer only for such calls; when it
fires it runs ``on_expire`` (e.g. set the analysis's stop flag, or cancel a stalled
upload) and the handler reports DEADLINE_EXCEEDED (``expired``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

#: ``time_remaining()`` beyond this (about 3 years) means the client set no deadline:
#: grpcio reports an infinite deadline as a huge number of seconds, not None.
NO_DEADLINE_S = 1e8


def has_client_deadline(context: grpc.ServicerContext) -> bool:
    """True when the caller set a deadline on this call."""
    remaining = context.time_remaining()
    return remaining is not None and remaining < NO_DEADLINE_S


class DefaultDeadline:
    """A timer armed when the call has no deadline of its own.

    Args:
        context: the call (see :func:`has_client_deadline`).
        default_s: seconds to allow; 0 disables.
        on_expire: run once (on a timer thread) when the default deadline passes.
    """

    def __init__(
        self,
        context: grpc.ServicerContext,
        default_s: float,
        on_expire: Callable[[], object],
    ) -> None:
        self._expired = threading.Event()
        self._on_expire = on_expire
        self._timer: threading.Timer | None = None
        if default_s > 0 and not has_client_deadline(context):
            self._timer = threading.Timer(default_s, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self._expired.set()
        self._on_expire()

    @property
    def armed(self) -> bool:
        """True when the server's default applies (the client set no deadline)."""
        return self._timer is not None

    @property
    def expired(self) -> bool:
        """True once the default deadline has passed."""
        return self._expired.is_set()

    def cancel(self) -> None:
        """Disarm the timer (call when the handler ends)."""
        if self._timer is not None:
            self._timer.cancel()


class StreamLimiter(grpc.ServerInterceptor):
    """Caps concurrent calls of request-streaming methods, which hold a server thread
    for as long as the client keeps the stream open.

    A call beyond a method's cap ends at once with RESOURCE_EXHAUSTED, so idle streams
    can never take every thread of the pool (health checks and GetModelInfo included).

    Args:
        limits: full method name (``"/package.Service/Method"``) to concurrent calls.
    """

    def __init__(self, limits: dict[str, int]) -> None:
        self._slots = {m: threading.BoundedSemaphore(n) for m, n in limits.items()}
        self._limits = dict(limits)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        slots = self._slots.get(method)
        if handler is None or slots is None or not handler.request_streaming:
            return handler
        limit = self._limits[method]

        def admit(context: grpc.ServicerContext) -> None:
            if not slots.acquire(blocking=False):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server already has {limit} open {method.rsplit('/', 1)[-1]} "
                    "streams; retry later",
                )

        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.response_streaming:
            behavior = handler.stream_stream

            def streaming(requests: object, context: grpc.ServicerContext) -> object:
                admit(context)
                try:
                    yield from behavior(requests, context)
                finally:
                    slots.release()

            return grpc.stream_stream_rpc_method_handler(streaming, des, ser)
        unary = handler.stream_unary

        def single(requests: object, context: grpc.ServicerContext) -> object:
            admit(context)
            try:
                return unary(requests, context)
            finally:
                slots.release()

        return grpc.stream_unary_rpc_method_handler(single, des, ser)
