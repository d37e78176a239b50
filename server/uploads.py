"""Slide uploads (UploadSlide) for callers without the server's filesystem.

The upload area is one directory (``--upload-dir``, default a private temporary
directory removed on shutdown). An upload streams into ``<random>.part`` (mode 0600,
``O_EXCL``) while its size is checked against the declared size and the cap; at the
end its SHA-256 is compared with the declared one, the file is fsynced and atomically
renamed to ``<upload id><suffix>`` (OpenSlide needs the suffix; the caller's file name
is never sent). The upload id (``secrets.token_urlsafe``, 192 bits) is the only
handle; it resolves only for the caller who uploaded it.

Limits: a per-upload cap (SLIDE_TOO_LARGE), a quota over all stored plus in-flight
uploads and a cap on concurrent uploads (UPLOAD_QUOTA_EXCEEDED), chunks of at most
1 MiB, and the server's default deadline for clients that set none. Uploads expire
``ttl_s`` after their last use; a sweeper thread (and every new upload) deletes expired
ones. A failed, cancelled or interrupted upload removes its partial file at once
(``try/finally`` plus an RPC-termination callback).
Uploads live in memory only: on start the area is cleared of files this module made
(``*.part`` and ``<id><suffix>`` names; nothing else is touched), so uploads do not
survive a restart. The default area is ``histohelper-uploads-<uid>-<random>`` in the
temporary folder, holding ``server.lock`` (the pid, ``flock``-ed for the server's
life); a server starting with the default area deletes the default areas of the same
user whose lock nobody holds (their server died, e.g. by ``kill -9``), never a live
server's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from histohelper.errors import (
    SlideNotFoundError,
    SlidePathError,
    SlideTooLargeError,
    UploadChecksumError,
    UploadError,
    UploadQuotaError,
)

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 1024 * 1024
#: Single-file slide formats OpenSlide reads. Multi-file formats cannot be uploaded:
#: a Hamamatsu ``.vms`` index names its image files by path (``ImageFile=../x.jpg``),
#: so an uploaded one could make OpenSlide read files outside the upload area. Each
#: upload lives alone in its own directory, because OpenSlide's DICOM driver also
#: opens the other DICOM files of a series found beside the one it is given.
ALLOWED_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".svslide", ".bif", ".dcm"})
_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_OWN_FILE = re.compile(r"^(?:[A-Za-z0-9_-]{32}\.[a-z]{3,7}|tmp-[A-Za-z0-9_-]{16,}\.part)$")
#: File name of a stored upload inside its own directory (``<root>/<id>/slide.svs``).
_STORED_STEM = "slide"
#: Lock file of a default upload area: its server's pid, ``flock``-ed while it lives.
LOCK_NAME = "server.lock"


def _remove_stored(path: Path) -> None:
    """Delete a stored upload and its directory (missing ones are fine)."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


@dataclass
class StoredUpload:
    """One completed upload."""

    upload_id: str
    path: Path
    size_bytes: int
    sha256_hex: str
    owner: str
    expires_at: float


class UploadWriter:
    """An upload in progress: a reserved share of the quota and an open partial file.

    Made by :meth:`UploadStore.begin`. Thread-safe: :meth:`abort` may come from the
    RPC-termination callback while the handler thread writes.
    """

    def __init__(
        self, store: UploadStore, size_bytes: int, sha256_hex: str, suffix: str, owner: str
    ) -> None:
        self.store = store
        self.size_bytes = size_bytes
        self.sha256_hex = sha256_hex
        self.suffix = suffix
        self.owner = owner
        self.written = 0
        self.part_path = store.root / f"tmp-{secrets.token_urlsafe(16)}.part"
        self._digest = hashlib.sha256()
        self._lock = threading.Lock()
        self._state = "open"  # open -> committed | aborted
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self._fd: int | None = os.open(self.part_path, flags, 0o600)

    def write(self, chunk: bytes) -> None:
        """Append a chunk.

        Raises:
            SlideTooLargeError: the bytes would pass the upload cap.
            UploadError: more bytes than declared, or the upload was aborted.
        """
        with self._lock:
            if self._state != "open" or self._fd is None:
                raise UploadError("the upload was aborted")
            total = self.written + len(chunk)
            if total > self.store.max_bytes:
                raise SlideTooLargeError(
                    f"the upload exceeds the server's limit of {self.store.max_bytes} bytes"
                )
            if total > self.size_bytes:
                raise UploadError("the upload has more bytes than its metadata declared")
            view = memoryview(chunk)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self._digest.update(chunk)
            self.written = total

    def commit(self) -> StoredUpload:
        """Check size and SHA-256, fsync, and atomically rename into place.

        Raises:
            UploadError: fewer bytes than declared.
            UploadChecksumError: the SHA-256 differs from the declared one.
        """
        with self._lock:
            if self._state != "open" or self._fd is None:
                raise UploadError("the upload was aborted")
            if self.written != self.size_bytes:
                raise UploadError(
                    f"the upload ended after {self.written} of {self.size_bytes} declared bytes"
                )
            if not hmac.compare_digest(self._digest.hexdigest(), self.sha256_hex):
                raise UploadChecksumError("the uploaded bytes do not match the declared SHA-256")
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            upload_id = secrets.token_urlsafe(24)
            folder = self.store.root / upload_id
            folder.mkdir(mode=0o700)
            final = folder / f"{_STORED_STEM}{self.suffix}"
            os.replace(self.part_path, final)
            self.store._fsync_dir()
            self._state = "committed"
        return self.store._register(self, upload_id, final)

    def abort(self) -> None:
        """Close and delete the partial file and free the reservation (idempotent;
        a no-op after commit)."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "aborted"
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.part_path.unlink(missing_ok=True)
        self.store._release(self)


class UploadStore:
    """The upload area: quota, expiry, id resolution.

    Args:
        root: the upload directory (created 0700 if missing); None makes a private
            temporary directory ``histohelper-uploads-<uid>-*`` holding a locked
            ``server.lock``, removed by :meth:`close`; the default areas of this user's
            dead servers (lock not held) are deleted first.
        max_bytes: largest single upload.
        quota_bytes: all stored plus in-flight (declared) bytes together.
        ttl_s: seconds an upload lives after its last use.
        max_concurrent: UploadSlide handlers running at once (:meth:`slot`).
        clock: monotonic clock (tests may pass a fake one).
        sweep_interval_s: period of the background sweeper; None: ``min(ttl_s / 4, 60)``;
            0 disables the thread (sweeps still happen on each new upload).
    """

    def __init__(
        self,
        root: Path | None,
        *,
        max_bytes: int,
        quota_bytes: int,
        ttl_s: float,
        max_concurrent: int = 4,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval_s: float | None = None,
    ) -> None:
        self._owns_root = root is None
        self._lock_fd: int | None = None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix=self._default_prefix()))
            self._lock_fd = self._hold_lock(root)
            self._purge_dead_areas(root)
        else:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self.quota_bytes = quota_bytes
        self.ttl_s = ttl_s
        self.max_concurrent = max_concurrent
        self.clock = clock
        self._lock = threading.Lock()
        self._uploads: dict[str, StoredUpload] = {}
        self._in_flight: set[UploadWriter] = set()
        self._stored_bytes = 0
        self._reserved_bytes = 0
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._stop = threading.Event()
        self._purge_own_files()
        interval = min(ttl_s / 4, 60.0) if sweep_interval_s is None else sweep_interval_s
        self._sweeper: threading.Thread | None = None
        if interval > 0:
            self._sweeper = threading.Thread(
                target=self._sweep_loop, args=(interval,), name="upload-sweeper", daemon=True
            )
            self._sweeper.start()

    # --- default area -----------------------------------------------------------------

    @staticmethod
    def _default_prefix() -> str:
        return f"histohelper-uploads-{os.getuid()}-"

    @staticmethod
    def _hold_lock(root: Path) -> int:
        """Create ``root/server.lock`` holding this pid, ``flock``-ed; returns its fd
        (kept open for the store's life: the kernel drops the lock when the process
        dies, however it dies). The file is locked under a temporary name and renamed
        into place, so no other server ever finds it unlocked while this one lives."""
        tmp = root / f"{LOCK_NAME}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.replace(tmp, root / LOCK_NAME)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd

    def _purge_dead_areas(self, own: Path) -> int:
        """Delete this user's default upload areas whose lock nobody holds; returns how
        many. Areas of other users, of live servers, or without a lock file (one being
        set up, or made by an older version) are left alone."""
        removed = 0
        parent = own.parent
        for entry in os.scandir(parent):
            if not entry.name.startswith(self._default_prefix()) or entry.path == str(own):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
                continue
            if self._remove_if_dead(Path(entry.path)):
                removed += 1
        if removed:
            log.info("stale upload areas of dead servers removed", extra={"count": removed})
        return removed

    @staticmethod
    def _remove_if_dead(area: Path) -> bool:
        """Remove ``area`` if its ``server.lock`` can be locked (its server is dead)."""
        try:
            fd = os.open(area / LOCK_NAME, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return False  # no lock file: not judged
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False  # a live server holds it
                raise
            shutil.rmtree(area, ignore_errors=True)
            return True
        finally:
            os.close(fd)

    # --- bookkeeping ------------------------------------------------------------------

    def _purge_own_files(self) -> None:
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False) and _OWN_FILE.match(entry.name):
                Path(entry.path).unlink(missing_ok=True)
            elif entry.is_dir(follow_symlinks=False) and _ID.match(entry.name):
                for suffix in ALLOWED_SUFFIXES:
                    _remove_stored(Path(entry.path) / f"{_STORED_STEM}{suffix}")

    def _fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _register(self, writer: UploadWriter, upload_id: str, path: Path) -> StoredUpload:
        stored = StoredUpload(
            upload_id,
            path,
            writer.size_bytes,
            writer.sha256_hex,
            writer.owner,
            self.clock() + self.ttl_s,
        )
        with self._lock:
            self._in_flight.discard(writer)
            self._reserved_bytes -= writer.size_bytes
            self._stored_bytes += writer.size_bytes
            self._uploads[upload_id] = stored
        return stored

    def _release(self, writer: UploadWriter) -> None:
        with self._lock:
            if writer in self._in_flight:
                self._in_flight.discard(writer)
                self._reserved_bytes -= writer.size_bytes

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sweep()

    def sweep(self) -> int:
        """Delete expired uploads; returns how many."""
        now = self.clock()
        with self._lock:
            expired = [u for u in self._uploads.values() if u.expires_at <= now]
            for u in expired:
                del self._uploads[u.upload_id]
                self._stored_bytes -= u.size_bytes
        for u in expired:
            _remove_stored(u.path)
        if expired:
            log.info("uploads expired", extra={"count": len(expired)})
        return len(expired)

    @property
    def used_bytes(self) -> int:
        """Stored plus reserved (in-flight) bytes."""
        with self._lock:
            return self._stored_bytes + self._reserved_bytes

    @property
    def count(self) -> int:
        """Stored uploads."""
        with self._lock:
            return len(self._uploads)

    # --- API --------------------------------------------------------------------------

    def begin(self, size_bytes: int, sha256_hex: str, suffix: str, owner: str) -> UploadWriter:
        """Reserve quota and open a partial file for a new upload.

        Raises:
            UploadError: bad size, SHA-256 or suffix.
            SlideTooLargeError: ``size_bytes`` is over the cap.
            UploadQuotaError: the quota or the concurrent-upload limit is reached.
        """
        if size_bytes <= 0:
            raise UploadError("size_bytes must be > 0")
        if size_bytes > self.max_bytes:
            raise SlideTooLargeError(
                f"the upload exceeds the server's limit of {self.max_bytes} bytes"
            )
        if not _SHA256.match(sha256_hex):
            raise UploadError("sha256_hex must be 64 lowercase hex digits")
        if suffix not in ALLOWED_SUFFIXES:
            raise UploadError(f"suffix must be one of {sorted(ALLOWED_SUFFIXES)}")
        self.sweep()
        with self._lock:
            if self._stored_bytes + self._reserved_bytes + size_bytes > self.quota_bytes:
                raise UploadQuotaError("the server's upload quota is used up; retry later")
            self._reserved_bytes += size_bytes
            try:
                writer = UploadWriter(self, size_bytes, sha256_hex, suffix, owner)
            except BaseException:
                self._reserved_bytes -= size_bytes
                raise
            self._in_flight.add(writer)
        return writer

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of ``max_concurrent`` upload slots for a handler's whole life.

        A slot is held until the handler thread returns, even after its partial file
        was removed, so stalled clients cannot take more than ``max_concurrent`` threads.

        Raises:
            UploadQuotaError: all slots are taken.
        """
        if not self._slots.acquire(blocking=False):
            raise UploadQuotaError(
                f"{self.max_concurrent} uploads are already in flight; retry later"
            )
        try:
            yield
        finally:
            self._slots.release()

    def resolve(self, upload_id: str, owner: str) -> StoredUpload:
        """The upload ``upload_id`` of ``owner``; renews its expiry.

        Raises:
            SlidePathError: the id is malformed.
            SlideNotFoundError: unknown, expired, or another caller's upload.
        """
        if not _ID.match(upload_id):
            raise SlidePathError("upload_id is malformed")
        now = self.clock()
        with self._lock:
            stored = self._uploads.get(upload_id)
            if stored is None or stored.expires_at <= now or stored.owner != owner:
                stored = None
            else:
                stored.expires_at = now + self.ttl_s
        if stored is None or not stored.path.is_file():
            raise SlideNotFoundError("no upload with that id")
        return stored

    def close(self) -> None:
        """Stop the sweeper, abort uploads in flight and delete every upload."""
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        with self._lock:
            writers = list(self._in_flight)
            uploads = list(self._uploads.values())
            self._uploads.clear()
            self._stored_bytes = 0
        for writer in writers:
            writer.abort()
        for u in uploads:
            _remove_stored(u.path)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self._purge_own_files()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
