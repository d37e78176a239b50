"""Server-side default deadline for calls whose client set none.

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
