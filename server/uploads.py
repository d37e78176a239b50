"""Slide uploads (UploadSlide) for callers without the server's filesystem.

The upload area is one directory (``--upload-dir``, default a private temporary
directory removed on shutdown), which several replicas may share (a ReadWriteMany
volume): an upload id works on every server using the area. Layout::

    <root>/area.lock                  flock-ed for quota decisions, publishing and clean-up
    <root>/replicas/<rid>.lock        one per live server (its pid, flock-ed for its life)
    <root>/replicas/<rid>/            that server's uploads in flight and staged uploads
    <root>/<upload id>/slide<suffix>  a stored upload (alone in its 0700 directory) ...
    <root>/<upload id>/upload.json    ... and its record: owner, sha256, size, suffix,
                                      created and last use (wall-clock seconds)

An upload streams into ``replicas/<rid>/tmp-<random>-<declared size>.part`` (mode 0600,
``O_EXCL``) while its size is checked against the declared size and the cap; at the
end its SHA-256 is compared with the declared one, the file is fsynced and moved with
``os.replace`` into a staging directory beside its record (written to a temporary
file, fsynced and renamed), and the directory is renamed to ``<upload id>`` in one
step: no server ever sees an upload without its record or a record without its data
(OpenSlide needs the suffix; the caller's file name is never sent). The upload id
(``secrets.token_urlsafe``, 192 bits) is the only handle; it resolves only for the
caller who uploaded it, on any server sharing the area, and each use renews its last
use in the record (rewritten atomically).

Limits: a per-upload cap (SLIDE_TOO_LARGE), a quota over all stored plus in-flight
uploads of every server sharing the area (each in-flight file names its declared size)
and a cap on concurrent uploads per server (UPLOAD_QUOTA_EXCEEDED), chunks of at most
1 MiB, and the server's default deadline for clients that set none. Uploads expire
``ttl_s`` after their last use (servers sharing an area should share ``ttl_s``); a
sweeper thread (and every new upload) on any server deletes expired ones, and the
files of servers that died (their lock is free: ``kill -9``, a lost node) - uploads in
flight, staged ones. A failed, cancelled or interrupted upload removes its partial file
at once (``try/finally`` plus an RPC-termination callback).

Uploads live as long as some server uses the area: the last server to stop (or the
first to start when none is running) deletes every upload and its bookkeeping;
nothing else in the directory is touched. The default area is
``histohelper-uploads-<uid>-<random>`` in the temporary folder, holding ``server.lock``
(the pid, ``flock``-ed for the server's life); a server starting with the default area
deletes the default areas of the same user whose lock nobody holds (their server died,
e.g. by ``kill -9``), never a live server's. Locks are ``flock`` locks: on NFS they need
a client and server with working locking (NFSv4, or v3 with lockd).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
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
from typing import Any

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
#: Files of earlier versions, directly in the area: ``<id><suffix>`` and partial files.
_LEGACY_FILE = re.compile(r"^(?:[A-Za-z0-9_-]{32}\.[a-z]{3,7}|tmp-[A-Za-z0-9_-]{16,}\.part)$")
#: An upload in flight: ``tmp-<22 random characters>-<declared size>.part``.
_PART = re.compile(r"^tmp-[A-Za-z0-9_-]{22}-(\d{1,18})\.part$")
_REPLICA_LOCK = re.compile(r"^([0-9a-f]{16})\.lock$")
#: A replica lock being set up (locked under this name, then renamed), or left behind
#: by a server that died while setting it up.
_REPLICA_LOCK_TMP = re.compile(r"^[0-9a-f]{16}\.lock\.[0-9a-f]{16}$")
#: File name of a stored upload inside its own directory (``<root>/<id>/slide.svs``).
_STORED_STEM = "slide"
#: The record beside it.
RECORD_NAME = "upload.json"
RECORD_FORMAT = 1
#: Lock file of a default upload area: its server's pid, ``flock``-ed while it lives.
LOCK_NAME = "server.lock"
#: Lock taken for quota decisions, publishing uploads and the last server's clean-up.
AREA_LOCK = "area.lock"
#: Folder of the servers' locks and private folders.
REPLICAS = "replicas"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass
class StoredUpload:
    """One completed upload.

    Attributes:
        upload_id: the handle given to the caller.
        path: the slide file.
        size_bytes: its size in bytes.
        sha256_hex: its SHA-256 (64 lowercase hex digits).
        owner: the identity of the caller who uploaded it.
        expires_at: last use + ``ttl_s`` (seconds on the store's clock).
    """

    upload_id: str
    path: Path
    size_bytes: int
    sha256_hex: str
    owner: str
    expires_at: float


@dataclass(frozen=True)
class UploadRecord:
    """``<id>/upload.json``: what every server needs to resolve an upload.

    Times are seconds on the stores' clock (wall-clock time by default, comparable
    across machines).
    """

    owner: str
    sha256_hex: str
    size_bytes: int
    suffix: str
    created: float
    last_use: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": RECORD_FORMAT,
                "owner": self.owner,
                "sha256": self.sha256_hex,
                "size_bytes": self.size_bytes,
                "suffix": self.suffix,
                "created": self.created,
                "last_use": self.last_use,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> UploadRecord:
        """Parse and check a record.

        Raises:
            ValueError: not a record of this format.
        """
        data: Any = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError("not an upload record")
        record = cls(
            owner=data["owner"],
            sha256_hex=data["sha256"],
            size_bytes=data["size_bytes"],
            suffix=data["suffix"],
            created=float(data["created"]),
            last_use=float(data["last_use"]),
        )
        if (
            not isinstance(record.owner, str)
            or not isinstance(record.sha256_hex, str)
            or not _SHA256.match(record.sha256_hex)
            or not isinstance(record.size_bytes, int)
            or record.size_bytes <= 0
            or record.suffix not in ALLOWED_SUFFIXES
        ):
            raise ValueError("malformed upload record")
        return record


def _read_record(folder: Path) -> UploadRecord | None:
    """The record of the upload in ``folder``; None if missing, unreadable or malformed."""
    try:
        return UploadRecord.from_json((folder / RECORD_NAME).read_text())
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _write_record(folder: Path, record: UploadRecord) -> None:
    """Write ``folder/upload.json`` atomically: a temporary file, fsynced, renamed."""
    tmp = folder / f"{RECORD_NAME}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, record.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, folder / RECORD_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _hold_lock(directory: Path, name: str) -> int:
    """Create ``directory/name`` holding this pid, ``flock``-ed; returns its fd (kept
    open for the holder's life: the kernel drops the lock when the process dies,
    however it dies). The file is locked under a temporary name and renamed into
    place, so no other server ever finds it unlocked while this one lives."""
    tmp = directory / f"{name}.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(tmp, directory / name)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd


@contextlib.contextmanager
def _if_dead(lock: Path) -> Iterator[bool]:
    """Yield True, holding ``lock``, if nobody holds it (its server is dead); False if
    a live server holds it or it is gone."""
    try:
        fd = os.open(lock, os.O_RDWR | _NOFOLLOW)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield False  # a live server holds it
                return
            raise
        yield True
    finally:
        os.close(fd)


class UploadWriter:
    """An upload in progress: an open partial file whose name reserves its declared
    size of the quota.

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
        self.part_path = store.own_dir / f"tmp-{secrets.token_urlsafe(16)}-{size_bytes}.part"
        self._digest = hashlib.sha256()
        self._lock = threading.Lock()
        self._state = "open"  # open -> committed | aborted
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
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
        """Check size and SHA-256, fsync, and publish the upload with its record.

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
            now = self.store.clock()
            record = UploadRecord(
                self.owner, self.sha256_hex, self.size_bytes, self.suffix, now, now
            )
            upload_id = self.store._publish(self.part_path, record)
            self._state = "committed"
        self.store._forget(self)
        return self.store._stored(upload_id, record)

    def abort(self) -> None:
        """Close and delete the partial file, which frees its reservation (idempotent;
        a no-op after commit)."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "aborted"
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.part_path.unlink(missing_ok=True)
        self.store._forget(self)


class UploadStore:
    """The upload area: quota, expiry, id resolution; shared by the servers using it.

    Args:
        root: the upload directory (created 0700 if missing), possibly shared with other
            servers; None makes a private temporary directory
            ``histohelper-uploads-<uid>-*`` holding a locked ``server.lock``, removed by
            :meth:`close`; the default areas of this user's dead servers (lock not held)
            are deleted first.
        max_bytes: largest single upload.
        quota_bytes: all stored plus in-flight (declared) bytes of the area together.
        ttl_s: seconds an upload lives after its last use.
        max_concurrent: UploadSlide handlers running at once in this server (:meth:`slot`).
        clock: the clock of records and expiry, in seconds; wall-clock time by default,
            since servers on several machines compare each other's times (tests may pass
            a fake one).
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
        clock: Callable[[], float] = time.time,
        sweep_interval_s: float | None = None,
    ) -> None:
        self._owns_root = root is None
        self._lock_fd: int | None = None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix=self._default_prefix()))
            self._lock_fd = _hold_lock(root, LOCK_NAME)
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
        self._area_thread_lock = threading.Lock()
        self._in_flight: set[UploadWriter] = set()
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._stop = threading.Event()
        self._closed = False
        self.replica_id = secrets.token_hex(8)
        self._replica_fd = self._register()
        self.own_dir = self.root / REPLICAS / self.replica_id
        self.own_dir.mkdir(mode=0o700)
        with self._area_locked():
            self._purge_legacy_files()
            self._purge_dead_replicas()
            if not self._other_replicas():
                self._remove_uploads(everything=True)  # uploads do not outlive the servers
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
            with _if_dead(Path(entry.path) / LOCK_NAME) as dead:
                if dead:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
        if removed:
            log.info("stale upload areas of dead servers removed", extra={"count": removed})
        return removed

    # --- servers sharing the area -------------------------------------------------------

    def _register(self) -> int:
        """Hold ``replicas/<replica id>.lock`` for this store's life; returns its fd."""
        replicas = self.root / REPLICAS
        for _ in range(10):
            replicas.mkdir(mode=0o700, exist_ok=True)
            try:
                return _hold_lock(replicas, f"{self.replica_id}.lock")
            except FileNotFoundError:  # the last server's clean-up removed replicas/
                continue
        raise UploadError("the upload area's replicas folder keeps disappearing")

    @contextlib.contextmanager
    def _area_locked(self) -> Iterator[None]:
        """Hold ``area.lock`` (every server sharing the area, every thread). The last
        server to stop deletes the file while holding it: whoever then gets a lock on
        the deleted file sees that the path names another file (or none) and retries."""
        path = self.root / AREA_LOCK
        with self._area_thread_lock:  # flock on NFS is a POSIX lock: per process
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    try:
                        current = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                    except FileNotFoundError:
                        current = False
                except BaseException:
                    os.close(fd)
                    raise
                if current:
                    break
                os.close(fd)
            try:
                yield
            finally:
                os.close(fd)

    def _other_replicas(self) -> list[str]:
        """Ids of the other servers whose lock is held (dead ones are purged first)."""
        out = []
        for entry in os.scandir(self.root / REPLICAS):
            m = _REPLICA_LOCK.match(entry.name)
            if m is None or m.group(1) == self.replica_id:
                continue
            with _if_dead(Path(entry.path)) as dead:
                if not dead:
                    out.append(m.group(1))
        return out

    def _purge_dead_replicas(self) -> int:
        """Delete the locks and private folders (uploads in flight, staged uploads) of
        servers that died; returns how many. A folder without a lock is a dead server's:
        a server takes its lock before it makes its folder."""
        replicas = self.root / REPLICAS
        removed = 0
        for entry in os.scandir(replicas):
            path = Path(entry.path)
            m = _REPLICA_LOCK.match(entry.name)
            if m is not None and m.group(1) != self.replica_id:
                with _if_dead(path) as dead:
                    if dead:
                        shutil.rmtree(replicas / m.group(1), ignore_errors=True)
                        path.unlink(missing_ok=True)
                        removed += 1
            elif _REPLICA_LOCK_TMP.match(entry.name):
                with _if_dead(path) as dead:
                    if dead:
                        path.unlink(missing_ok=True)
            elif (
                entry.is_dir(follow_symlinks=False)
                and re.fullmatch(r"[0-9a-f]{16}", entry.name)
                and entry.name != self.replica_id
                and not (replicas / f"{entry.name}.lock").exists()
            ):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        if removed:
            log.info("files of dead upload servers removed", extra={"count": removed})
        return removed

    # --- bookkeeping ------------------------------------------------------------------

    def _purge_legacy_files(self) -> None:
        """Delete files earlier versions kept directly in the area."""
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False) and _LEGACY_FILE.match(entry.name):
                Path(entry.path).unlink(missing_ok=True)

    def _stored_folders(self) -> Iterator[tuple[str, Path, UploadRecord | None]]:
        for entry in os.scandir(self.root):
            if entry.is_dir(follow_symlinks=False) and _ID.match(entry.name):
                path = Path(entry.path)
                yield entry.name, path, _read_record(path)

    def _remove_uploads(self, *, everything: bool = False) -> int:
        """Delete expired uploads and folders without a valid record (all uploads when
        ``everything``); returns how many expired uploads (or all) were deleted.

        Each is first renamed into this server's private folder, so that no server
        finds it half deleted."""
        now = self.clock()
        removed = 0
        for upload_id, path, record in self._stored_folders():
            expired = record is not None and record.last_use + self.ttl_s <= now
            if not (everything or expired or record is None):
                continue
            trash = self.own_dir / f"trash-{upload_id}"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                continue  # another server took it first
            shutil.rmtree(trash, ignore_errors=True)
            removed += record is not None
        return removed

    def _publish(self, part: Path, record: UploadRecord) -> str:
        """Move a verified partial file into place beside its record; returns the id."""
        upload_id = secrets.token_urlsafe(24)
        staged = self.own_dir / upload_id
        # Under the area lock: the quota of other servers never misses these bytes.
        with self._area_locked():
            staged.mkdir(mode=0o700)
            try:
                os.replace(part, staged / f"{_STORED_STEM}{record.suffix}")
                _write_record(staged, record)
                os.rename(staged, self.root / upload_id)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
        self._fsync_dir()
        return upload_id

    def _stored(self, upload_id: str, record: UploadRecord) -> StoredUpload:
        return StoredUpload(
            upload_id,
            self.root / upload_id / f"{_STORED_STEM}{record.suffix}",
            record.size_bytes,
            record.sha256_hex,
            record.owner,
            record.last_use + self.ttl_s,
        )

    def _fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _forget(self, writer: UploadWriter) -> None:
        with self._lock:
            self._in_flight.discard(writer)

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sweep()
            except OSError:  # e.g. a network volume gone for a moment: try again later
                log.warning("upload sweep failed", exc_info=True)

    def sweep(self) -> int:
        """Delete expired uploads (any server's) and the files of dead servers; returns
        how many uploads expired."""
        self._purge_dead_replicas()
        expired = self._remove_uploads()
        if expired:
            log.info("uploads expired", extra={"count": expired})
        return expired

    def _reserved_bytes(self) -> int:
        """Declared bytes of every server's uploads in flight."""
        total = 0
        for folder in os.scandir(self.root / REPLICAS):
            if not folder.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(folder.path):
                m = _PART.match(entry.name)
                if m is not None:
                    total += int(m.group(1))
        return total

    def _used_bytes(self) -> int:
        stored = sum(r.size_bytes for _, _, r in self._stored_folders() if r is not None)
        return stored + self._reserved_bytes()

    @property
    def used_bytes(self) -> int:
        """Stored plus reserved (in-flight) bytes of every server sharing the area."""
        return self._used_bytes()

    @property
    def count(self) -> int:
        """Stored uploads (of every server)."""
        return sum(1 for _, _, r in self._stored_folders() if r is not None)

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
        with self._area_locked():
            if self._used_bytes() + size_bytes > self.quota_bytes:
                raise UploadQuotaError("the server's upload quota is used up; retry later")
            writer = UploadWriter(self, size_bytes, sha256_hex, suffix, owner)
        with self._lock:
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
        """The upload ``upload_id`` of ``owner``, whichever server stored it; renews its
        last use in the record.

        Raises:
            SlidePathError: the id is malformed.
            SlideNotFoundError: unknown, expired, or another caller's upload.
        """
        if not _ID.match(upload_id):
            raise SlidePathError("upload_id is malformed")
        folder = self.root / upload_id
        record = _read_record(folder)
        if record is None:
            # Stored by another server a moment ago? An NFS client may still remember the
            # name as missing; opening the folder revalidates it (close-to-open).
            with os.scandir(self.root):
                pass
            record = _read_record(folder)
        now = self.clock()
        if record is None or record.owner != owner or record.last_use + self.ttl_s <= now:
            raise SlideNotFoundError("no upload with that id")
        stored = self._stored(upload_id, record)
        if not stored.path.is_file():
            raise SlideNotFoundError("no upload with that id")
        renewed = UploadRecord(
            record.owner,
            record.sha256_hex,
            record.size_bytes,
            record.suffix,
            record.created,
            max(now, record.last_use),
        )
        try:
            _write_record(folder, renewed)
        except FileNotFoundError:  # deleted meanwhile (expired on another server)
            raise SlideNotFoundError("no upload with that id") from None
        stored.expires_at = renewed.last_use + self.ttl_s
        return stored

    def close(self) -> None:
        """Stop the sweeper and abort this server's uploads in flight; the last server
        using the area deletes every upload and the area's bookkeeping. A second call
        does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        with self._lock:
            writers = list(self._in_flight)
        for writer in writers:
            writer.abort()
        replicas = self.root / REPLICAS
        with self._area_locked():
            shutil.rmtree(self.own_dir, ignore_errors=True)
            self._purge_dead_replicas()
            last = not self._other_replicas()
            if last:
                self.own_dir.mkdir(mode=0o700)  # room for the renames of _remove_uploads
                self._remove_uploads(everything=True)
                self._purge_legacy_files()
                shutil.rmtree(self.own_dir, ignore_errors=True)
            (replicas / f"{self.replica_id}.lock").unlink(missing_ok=True)
            os.close(self._replica_fd)
            if last:
                with contextlib.suppress(OSError):
                    replicas.rmdir()  # not empty: a server is starting; it keeps it
                (self.root / AREA_LOCK).unlink(missing_ok=True)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
