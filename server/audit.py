"""Audit log: one JSON line per call to the analysis service.

Each line holds ``time`` (UTC, ISO 8601), ``rpc``, ``request_id``, ``caller`` (the
token's identity, ``cert:<CN>`` for a mutual-TLS client, or ``anonymous``),
``client_cert`` (CN, when one was presented), ``peer`` (transport address),
``model_version``, ``slide_fingerprint`` (a hash, never a name or path), ``outcome``
(gRPC status name), ``reason`` (ErrorInfo reason of a failure) and ``duration_s``.
Bearer tokens never reach it.

The call path (:mod:`histohelper.server.callpath`) opens a :class:`CallRecord` for
each call and makes it the call's current record (a :mod:`contextvars` variable: the
call's coroutine and every piece of blocking work it runs on a worker thread see it);
handlers add what only they know (slide fingerprint) with :func:`note`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
audit_logger = logging.getLogger("histohelper.audit")

#: Bytes hashed from each end of a slide for its fingerprint.
FINGERPRINT_EDGE_BYTES = 1024 * 1024

_current: ContextVar[CallRecord | None] = ContextVar("histohelper_call", default=None)


@dataclass
class CallRecord:
    """What the audit log says about one call (mutable while the call runs)."""

    rpc: str
    request_id: str = ""
    caller: str = "anonymous"
    client_cert: str | None = None
    peer: str = ""
    model_version: str = ""
    slide_fingerprint: str | None = None
    outcome: str = ""
    reason: str | None = None
    duration_s: float = 0.0
    started: float = 0.0


def current() -> CallRecord | None:
    """The record of the call this code runs for (its coroutine or its worker thread)."""
    return _current.get()


def set_current(record: CallRecord | None) -> None:
    """Make ``record`` the current record of this context (None clears it)."""
    _current.set(record)


def note(**fields: Any) -> None:
    """Set fields of the current call's record; a no-op outside a call."""
    record = current()
    if record is None:
        return
    for key, value in fields.items():
        if hasattr(record, key):
            setattr(record, key, value)


def current_caller() -> str:
    """The identity of the current call's caller (``anonymous`` outside a call)."""
    record = current()
    return record.caller if record is not None else "anonymous"


def slide_fingerprint(path: Path) -> str:
    """A stable hash of a slide file that never reveals its name.

    SHA-256 over the size (8 bytes, big-endian), the first and the last MiB: cheap for
    multi-GB slides and distinct for distinct scans in practice; the whole file is
    hashed when it is at most 2 MiB.

    Returns:
        ``"sha256-edges:<hex>"``, or ``"unreadable"`` when the file cannot be read.
    """
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            digest = hashlib.sha256(size.to_bytes(8, "big"))
            digest.update(fh.read(FINGERPRINT_EDGE_BYTES))
            if size > FINGERPRINT_EDGE_BYTES:
                fh.seek(max(FINGERPRINT_EDGE_BYTES, size - FINGERPRINT_EDGE_BYTES))
                digest.update(fh.read(FINGERPRINT_EDGE_BYTES))
    except OSError:
        return "unreadable"
    return f"sha256-edges:{digest.hexdigest()}"


class AuditLog:
    """Writes finished :class:`CallRecord` objects as JSON lines.

    Args:
        path: file to append to (created with mode 0600); None writes each entry to the
            ``histohelper.audit`` logger at INFO (JSON on stderr under ``serve``).

    Thread-safe; each line is flushed as it is written.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fh = None
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._fh = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def write(self, record: CallRecord) -> None:
        """Append one entry for a finished call."""
        entry = asdict(record)
        entry.pop("started", None)
        entry["duration_s"] = round(record.duration_s, 6)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **entry,
        }
        if self._fh is None:
            audit_logger.info("audit", extra={"audit": entry})
            return
        line = json.dumps(entry, default=str)
        with self._lock:
            if self._fh is not None:
                self._fh.write(line + "\n")

    def close(self) -> None:
        """Close the file (later entries are dropped)."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
