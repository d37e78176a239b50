"""The result cache of AnalyzeSlide (``histohelper serve --cache-dir DIR``).

An analysis is a function of the slide's bytes, the served model and the effective
options, so its event stream can be stored once and replayed: a repeated request
costs a lookup and a read instead of tiling and inference.

**Key** (:func:`analysis_key`): SHA-256 over the slide's full-content SHA-256 (and its
file suffix, which picks the reader), the served model (:class:`ModelIdentity`:
artifact SHA-256, engine, precision, device, model-worker concurrency), the server
code (:func:`code_fingerprint`) and every field of the effective
:class:`~histohelper.server.pipeline.AnalysisSpec` but the request id and the slide
path (tiling geometry and thresholds, the region of interest by its normalised digest,
batch size, return_* flags, MC-dropout passes;
the tiler's ``max_patches`` limit only refuses slides, so it is left out). The batch
size is in the key: it shapes the stream (patch results and progress come one event
per batch) and it changes outputs: TorchScript fp32 on CPU gave probabilities up to
5.4e-7 apart for the same 32 patches in batches of 8 against one batch of 32
(embeddings equal), so a hit could not be bit-identical to a miss at another size.

**Content hashes** (:class:`ContentHashes`): a slide's full-content SHA-256 is memoised
in ``DIR/hashes`` by its file identity (device, inode, size, mtime and ctime in ns), so
a multi-GB slide is read once (the inode's change time, which no user call can set,
tells a rewrite in place that kept size and mtime, e.g. ``rsync --inplace -t``); an
upload's verified SHA-256 is recorded there directly.

**Entries** (``DIR/entries/<2 hex>/<key>.hhr``): a fixed header (:data:`ENTRY_HEADER`:
magic ``b"HHRC"``, format version, key, payload size, record count, payload SHA-256;
big-endian), then the payload: per event its length (u32) and its serialized
``AnalyzeSlideResponse``. A miss writes the stream to a temporary file in the same
directory as each event is sent, and ``os.replace`` s it into place only after the
completed event went out: readers never see a partial entry; an analysis that fails,
is cancelled or passes its deadline leaves nothing. Every lookup verifies the header
and the payload's SHA-256 before the first event is sent; a bad entry is removed,
counted, logged (request id only) and recomputed, never served.

**Size bound**: LRU by last access (a hit sets the entry's mtime); after each store the
oldest entries are removed until the directory's entries fit ``max_bytes``; an entry
that alone exceeds it is not stored. A ``DIR`` deleted while the server runs is made
again (``mkdir -p``, with the modes it had at start-up) at the next analysis, with one
WARNING; if it cannot be made, one WARNING says so and nothing is stored (no warning
per call) until it can. Several replicas may share ``DIR``: writes are
atomic renames and eviction tolerates files that vanish under it.

**Concurrent identical requests** compute once per process: the first computes, the
others wait for it and replay its entry; if it stores nothing (it failed, was
cancelled, or its entry was too big), one waiter computes in turn. Replicas sharing
``DIR`` do not coordinate: each may compute a key once, and the last rename wins with
equal content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

from histohelper.errors import AnalysisCancelledError
from histohelper.server.pipeline import AnalysisSpec
from histohelper.server.tiling.slide import SlideSource
from histohelper.v1 import slide_analysis_pb2 as pb

if TYPE_CHECKING:
    from histohelper.server.runtime import ModelRuntime

log = logging.getLogger(__name__)

#: Version of the entry format; an entry of another version is removed and recomputed.
FORMAT_VERSION = 1
MAGIC = b"HHRC"
#: magic, format version, key, payload bytes, records, payload SHA-256.
ENTRY_HEADER = struct.Struct(">4sI32sQQ32s")
_RECORD = struct.Struct(">I")
ENTRY_SUFFIX = ".hhr"
#: A temporary entry not written to for this long belongs to a process that died.
STALE_TMP_S = 3600.0
#: A content-hash memo not used for this long is removed by eviction.
STALE_HASH_S = 30 * 86400.0
_CHUNK = 4 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Outcome = Literal["hit", "miss", "corrupt"]


class CacheDirError(RuntimeError):
    """The cache directory cannot be created, written or renamed in."""


class CorruptEntryError(Exception):
    """A cache entry failed verification (its message says how)."""


# --- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    """What of the served model decides its outputs.

    Attributes:
        artifact_sha256: SHA-256 of the loaded artifact file (of the manifest JSON when
            the runtime came from no file).
        engine: ``torchscript``, ``onnxruntime`` or ``openvino``.
        precision: served precision (``fp32``, ``bf16``, ``int8`` ...).
        device: ``cpu``, ``cuda:0`` ...
        concurrency: model-worker threads (shapes the last batches of a stream).
    """

    artifact_sha256: str
    engine: str
    precision: str
    device: str
    concurrency: int


def file_sha256(path: Path, stop: threading.Event | None = None) -> str:
    """SHA-256 (hex) of a file's whole content, read in 4 MiB chunks (hashlib/OpenSSL).

    Raises:
        OSError: the file cannot be read.
        AnalysisCancelledError: ``stop`` was set (checked between chunks).
    """
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            if stop is not None and stop.is_set():
                raise AnalysisCancelledError("stopped while hashing the slide")
    return digest.hexdigest()


def code_fingerprint() -> str:
    """SHA-256 over the source of the code that makes the event stream (the
    ``histohelper`` core, its generated ``v1`` code and ``histohelper.server``), so
    an upgraded server never replays an older server's stream."""
    import histohelper
    import histohelper.server

    digest = hashlib.sha256()
    roots = [Path(histohelper.__file__).parent, Path(histohelper.server.__file__).parent]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if {"model_export", "client"} & set(path.relative_to(root).parts):
                continue
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def analysis_key(spec: AnalysisSpec, content_sha256: str, model: ModelIdentity, code: str) -> str:
    """The cache key (64 hex digits) of one analysis (see the module docstring).

    Args:
        spec: the effective request; every field but ``request_id`` and
            ``slide_path`` enters the key, so an option added later does too.
        content_sha256: SHA-256 of the slide file's whole content.
        model: the served model.
        code: :func:`code_fingerprint`.
    """
    options = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(spec)
        if f.name not in ("request_id", "slide_path")
    }
    tiling = dataclasses.asdict(spec.tiling)
    tiling.pop("max_patches", None)  # only refuses slides over it; never shapes a stream
    # A region of interest enters by the digest of its normalised geometry and mask.
    tiling["roi"] = spec.tiling.roi.sha256 if spec.tiling.roi is not None else None
    options["tiling"] = tiling
    # The stain choice as data (method, reference, source and the target's statistics):
    # another reference image or method is another key.
    options["stain"] = dataclasses.asdict(spec.stain)
    parts = {
        "format": FORMAT_VERSION,
        "code": code,
        "slide_sha256": content_sha256,
        "slide_suffix": spec.slide_path.suffix.lower(),
        "model": dataclasses.asdict(model),
        "options": options,
    }
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --- content hashes -----------------------------------------------------------------------


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class ContentHashes:
    """Full-content SHA-256 of slide files, memoised on disk by file identity.

    Args:
        directory: where the memos live (one small file per slide version).

    Attributes:
        last_rate_bytes_per_s: rate of the last full hash computed here (0 before).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.last_rate_bytes_per_s = 0.0

    def _memo(self, st: os.stat_result) -> Path:
        return self.directory / hashlib.sha256(_identity(st).encode()).hexdigest()

    def sha256(self, path: Path, stop: threading.Event | None = None) -> str:
        """The file's full-content SHA-256 (hex), from the memo or hashed (and memoised).

        Raises:
            OSError: the file cannot be read.
            AnalysisCancelledError: ``stop`` was set while hashing.
        """
        st = os.stat(path)
        memo = self._memo(st)
        try:
            text = memo.read_text().strip()
        except OSError:
            text = ""
        if _HEX64.fullmatch(text):
            _touch(memo)
            return text
        t0 = time.perf_counter()
        digest = file_sha256(path, stop)
        seconds = time.perf_counter() - t0
        self.last_rate_bytes_per_s = st.st_size / max(seconds, 1e-9)
        log.debug("slide hashed", extra={"size_bytes": st.st_size, "seconds": round(seconds, 3)})
        if _identity(os.stat(path)) == _identity(st):  # unchanged while it was read
            self._write(memo, digest)
        return digest

    def remember(self, path: Path, sha256_hex: str) -> None:
        """Record a SHA-256 already known (a verified upload's) for ``path``."""
        with contextlib.suppress(OSError):
            self._write(self._memo(os.stat(path)), sha256_hex)

    def _write(self, memo: Path, digest: str) -> None:
        tmp = memo.with_name(f".{memo.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(digest)
            os.replace(tmp, memo)
        except OSError as exc:  # a memo is an optimisation: hash again next time
            log.warning("could not record a slide hash: %s", exc.strerror)
            _unlink(tmp)


# --- entries ------------------------------------------------------------------------------


class Entry:
    """A verified cache entry, open for replay (a context manager; closes its file).

    Attributes:
        records: number of events stored.
        payload_bytes: size of the payload after the header.
    """

    def __init__(self, fh: BinaryIO, records: int, payload_bytes: int) -> None:
        self._fh = fh
        self.records = records
        self.payload_bytes = payload_bytes

    def events(self) -> Iterator[bytes]:
        """The stored events, in order, each one serialized ``AnalyzeSlideResponse``."""
        fh = self._fh
        fh.seek(ENTRY_HEADER.size)
        for _ in range(self.records):
            (n,) = _RECORD.unpack(fh.read(_RECORD.size))
            yield fh.read(n)

    def close(self) -> None:
        """Close the entry's file."""
        self._fh.close()

    def __enter__(self) -> Entry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _verify(fh: BinaryIO, key: str) -> Entry:
    """Check an entry's header, size, payload SHA-256 and framing.

    Raises:
        CorruptEntryError: any check failed.
    """
    head = fh.read(ENTRY_HEADER.size)
    if len(head) != ENTRY_HEADER.size:
        raise CorruptEntryError("truncated header")
    magic, version, raw_key, payload_bytes, records, payload_sha = ENTRY_HEADER.unpack(head)
    if magic != MAGIC:
        raise CorruptEntryError("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"format version {version}, expected {FORMAT_VERSION}")
    if raw_key != bytes.fromhex(key):
        raise CorruptEntryError("key mismatch")
    size = os.fstat(fh.fileno()).st_size
    if size != ENTRY_HEADER.size + payload_bytes:
        raise CorruptEntryError(f"size {size}, header says {ENTRY_HEADER.size + payload_bytes}")
    digest = hashlib.sha256()
    framed, seen = 0, 0
    # One pass: hash the payload and walk its framing (each length prefix, then skip).
    while framed < payload_bytes:
        prefix = fh.read(_RECORD.size)
        if len(prefix) != _RECORD.size:
            raise CorruptEntryError("truncated record length")
        (n,) = _RECORD.unpack(prefix)
        digest.update(prefix)
        framed += _RECORD.size + n
        if framed > payload_bytes:
            raise CorruptEntryError("record runs past the payload")
        left = n
        while left:
            chunk = fh.read(min(left, _CHUNK))
            if not chunk:
                raise CorruptEntryError("truncated record")
            digest.update(chunk)
            left -= len(chunk)
        seen += 1
    if seen != records:
        raise CorruptEntryError(f"{seen} records, header says {records}")
    if digest.digest() != payload_sha:
        raise CorruptEntryError("payload checksum mismatch")
    return Entry(fh, records, payload_bytes)


class EntryWriter:
    """Writes one entry to a temporary file; :meth:`commit` renames it into place.

    Write errors (a full disk) and an entry outgrowing the cache's bound end the
    writing quietly (the analysis goes on; nothing is stored).
    """

    def __init__(self, cache: ResultCache, key: str) -> None:
        self.cache = cache
        self.key = key
        self.path = cache.entry_path(key)
        self.tmp = self.path.with_name(f".{key}.{uuid.uuid4().hex}.tmp")
        self.size = ENTRY_HEADER.size
        self.records = 0
        self.too_large = False
        self._digest = hashlib.sha256()
        self._fh: BinaryIO | None = None
        try:
            self.path.parent.mkdir(exist_ok=True)
            self._fh = self.tmp.open("xb")
            self._fh.write(bytes(ENTRY_HEADER.size))
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        log.warning("result cache write failed: %s", exc.strerror)
        self.abort()

    def add(self, event: bytes) -> None:
        """Append one serialized event."""
        if self._fh is None:
            return
        if self.size + _RECORD.size + len(event) > self.cache.max_bytes:
            self.too_large = True
            self.abort()
            return
        prefix = _RECORD.pack(len(event))
        try:
            self._fh.write(prefix)
            self._fh.write(event)
        except OSError as exc:
            self._fail(exc)
            return
        self._digest.update(prefix)
        self._digest.update(event)
        self.size += _RECORD.size + len(event)
        self.records += 1

    def commit(self) -> bool:
        """Write the header, flush to disk and rename into place. True if stored."""
        fh = self._fh
        if fh is None:
            return False
        header = ENTRY_HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            bytes.fromhex(self.key),
            self.size - ENTRY_HEADER.size,
            self.records,
            self._digest.digest(),
        )
        try:
            fh.seek(0)
            fh.write(header)
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            self._fh = None
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self._fail(exc)
            return False
        _touch(self.path)
        return True

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        _unlink(self.tmp)


@dataclass(frozen=True)
class Lookup:
    """The answer of :meth:`ResultCache.lookup`: ``entry`` is set on a hit only."""

    outcome: Outcome
    entry: Entry | None = None


class ResultCache:
    """The on-disk store of analysis event streams (see the module docstring).

    Args:
        directory: the cache directory (created if missing; may be shared).
        max_bytes: bound on the entries' total size.

    Attributes:
        counts: ``hit``, ``miss``, ``corrupt``, ``stored``, ``too_large``, ``evicted``,
            ``recreated`` (the directory was deleted and made again).
        hashes: the slides' content hashes.

    Raises:
        CacheDirError: the directory cannot be created, written or renamed in.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.entries_dir = directory / "entries"
        self.hashes = ContentHashes(directory / "hashes")
        self.counts: Counter[str] = Counter()
        self._lock = threading.Condition()
        self._flights: dict[str, int] = {}  # key -> waiters
        self._landed: dict[str, threading.Event] = {}
        self._modes: dict[Path, int] = {}  # directory -> its mode at start-up
        self._unusable = False  # the directory went missing and could not be made again
        try:
            for d in (self.entries_dir, self.hashes.directory):
                d.mkdir(parents=True, exist_ok=True)
            for d in (directory, self.entries_dir, self.hashes.directory):
                self._modes[d] = stat.S_IMODE(d.stat().st_mode)
            probe = self.entries_dir / f".probe.{uuid.uuid4().hex}.tmp"
            probe.write_bytes(b"histohelper")
            os.replace(probe, probe.with_suffix(".done"))
            probe.with_suffix(".done").unlink()
        except OSError as exc:
            raise CacheDirError(
                f"--cache-dir {directory} is not a usable directory "
                f"({exc.strerror or type(exc).__name__}); it must be writable"
            ) from None

    def ensure_directories(self, request_id: str = "") -> bool:
        """Make the cache's directories again when they were deleted (True if usable).

        Two ``stat`` calls when nothing is missing. Missing directories are made with
        the modes they had at start-up (``chmod`` after ``mkdir``, so the umask does
        not narrow them), counted as ``recreated`` and reported by one WARNING; when
        they cannot be made, one WARNING says the cache stores nothing until they can
        (later failures are logged at DEBUG only) and False is returned.
        """
        if self.entries_dir.is_dir() and self.hashes.directory.is_dir():
            return True
        with self._lock:
            missing = [d for d in self._modes if not d.is_dir()]
            if not missing:  # another call made them meanwhile
                return True
            try:
                for d in missing:
                    d.mkdir(parents=True, exist_ok=True)
                    os.chmod(d, self._modes[d])
            except OSError as exc:
                if not self._unusable:
                    self._unusable = True
                    log.warning(
                        "result cache directory is missing and cannot be made again (%s): "
                        "results are not cached until it can be",
                        exc.strerror or type(exc).__name__,
                        extra=_rid(request_id),
                    )
                else:
                    log.debug("result cache directory still missing", extra=_rid(request_id))
                return False
            self._unusable = False
            self.counts["recreated"] += 1
        log.warning(
            "result cache directory was missing (deleted while serving): recreated with "
            "its modes; results are cached again",
            extra=_rid(request_id),
        )
        return True

    def entry_path(self, key: str) -> Path:
        """Where the entry of ``key`` lives."""
        return self.entries_dir / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def lookup(self, key: str, request_id: str = "") -> Lookup:
        """The verified entry of ``key`` (hit; its mtime becomes now), or a miss. A
        corrupt, truncated or wrong-version entry is removed, counted, logged and
        reported as ``corrupt`` (recompute)."""
        path = self.entry_path(key)
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            self._count("miss")
            return Lookup("miss")
        except OSError as exc:
            log.warning("result cache entry unreadable: %s", exc.strerror, extra=_rid(request_id))
            self._count("miss")
            return Lookup("miss")
        try:
            entry = _verify(fh, key)
        except (CorruptEntryError, OSError, struct.error) as exc:
            ino = os.fstat(fh.fileno()).st_ino
            fh.close()
            try:
                if os.stat(path).st_ino == ino:  # not already replaced by another writer
                    path.unlink()
            except OSError:
                pass
            self._count("corrupt")
            log.warning(
                "result cache entry corrupt (%s): removed, recomputing", exc, extra=_rid(request_id)
            )
            return Lookup("corrupt")
        _touch(path)
        self._count("hit")
        return Lookup("hit", entry)

    def writer(self, key: str) -> EntryWriter:
        """A writer for the entry of ``key`` (call commit or abort)."""
        return EntryWriter(self, key)

    def store(self, writer: EntryWriter) -> bool:
        """Commit ``writer``'s entry, then evict to the bound. True if stored."""
        if writer.too_large:
            self._count("too_large")
        if not writer.commit():
            return False
        self._count("stored")
        self.evict()
        return True

    def evict(self) -> int:
        """Remove the least recently used entries until the entries fit ``max_bytes``;
        remove stale temporary files and unused hash memos. Returns entries removed."""
        now = time.time()
        found: list[tuple[int, int, Path]] = []
        for sub in _listdir(self.entries_dir):
            for path in _listdir(sub):
                try:
                    st = path.stat()
                except OSError:  # removed by another replica meanwhile
                    continue
                if path.name.endswith(".tmp"):
                    if now - st.st_mtime > STALE_TMP_S:
                        _unlink(path)
                elif path.name.endswith(ENTRY_SUFFIX):
                    found.append((st.st_mtime_ns, st.st_size, path))
        for memo in _listdir(self.hashes.directory):
            try:
                if now - memo.stat().st_mtime > STALE_HASH_S:
                    _unlink(memo)
            except OSError:
                continue
        total = sum(size for _, size, _ in found)
        removed = 0
        for _, size, path in sorted(found):
            if total <= self.max_bytes:
                break
            _unlink(path)
            total -= size
            removed += 1
        if removed:
            with self._lock:
                self.counts["evicted"] += removed
        return removed

    def size_bytes(self) -> int:
        """Total size of the stored entries."""
        total = 0
        for sub in _listdir(self.entries_dir):
            for path in _listdir(sub):
                if path.name.endswith(ENTRY_SUFFIX):
                    with contextlib.suppress(OSError):
                        total += path.stat().st_size
        return total

    # --- one computation per key (in this process) ------------------------------------------

    def lead(self, key: str, stop: threading.Event) -> bool:
        """True: the caller computes ``key`` and must call :meth:`land` after. False:
        another call was computing it and has ended (or ``stop`` was set): look again."""
        with self._lock:
            if key not in self._flights:
                self._flights[key] = 0
                self._landed[key] = threading.Event()
                return True
            self._flights[key] += 1
            landed = self._landed[key]
            self._lock.notify_all()
        try:
            while not landed.wait(0.05):
                if stop.is_set():
                    break
        finally:
            with self._lock:
                if key in self._flights and self._landed.get(key) is landed:
                    self._flights[key] -= 1
        return False

    def land(self, key: str) -> None:
        """The computation of ``key`` ended (stored or not): wake its waiters."""
        with self._lock:
            self._flights.pop(key, None)
            landed = self._landed.pop(key, None)
            self._lock.notify_all()
        if landed is not None:
            landed.set()

    def wait_for_waiters(self, n: int, timeout: float | None = None) -> bool:
        """Block until ``n`` calls in all wait for another's computation (tests)."""
        with self._lock:
            return self._lock.wait_for(lambda: sum(self._flights.values()) >= n, timeout)


def _rid(request_id: str) -> dict[str, str]:
    return {"request_id": request_id} if request_id else {}


def _listdir(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _touch(path: Path) -> None:
    """Set ``path``'s times to now, to the nanosecond (the kernel's own clock for
    ``utime(path)`` ticks in milliseconds: an LRU needs finer)."""
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


# --- AnalyzeSlide through the cache -------------------------------------------------------


class AnalysisCache:
    """AnalyzeSlide's event stream through a :class:`ResultCache`: replay a stored
    stream, or compute it once (per process) and store it while it is sent.

    Args:
        store: the cache.
        model: the served model's identity.
        on_result: called once per request with ``"hit"`` or ``"miss"`` (metrics).
    """

    def __init__(
        self,
        store: ResultCache,
        model: ModelIdentity,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.model = model
        self.code = code_fingerprint()
        self.on_result = on_result

    def remember_upload(self, path: Path, sha256_hex: str) -> None:
        """Record a verified upload's SHA-256 so its content is never hashed again."""
        self.store.hashes.remember(path, sha256_hex)

    def _result(self, outcome: str) -> None:
        if self.on_result is not None:
            self.on_result(outcome)

    def messages(
        self,
        spec: AnalysisSpec,
        compute: Callable[[], Iterator[pb.AnalyzeSlideResponse]],
        stop: threading.Event,
        t0: float,
    ) -> Iterator[pb.AnalyzeSlideResponse]:
        """The call's messages: replayed on a hit, else ``compute()``'s, stored as sent.

        Args:
            spec: the effective request.
            compute: the uncached stream (tiling, inference, aggregation).
            stop: the call's stop event.
            t0: ``time.perf_counter()`` at the call's arrival.
        """
        if not self.store.ensure_directories(spec.request_id):
            yield from compute()  # the directory is gone for good: serve uncached
            return
        try:
            content = (
                spec.slide_path.fingerprint()  # a DICOMweb series: UIDs + metadata hash
                if isinstance(spec.slide_path, SlideSource)
                else self.store.hashes.sha256(spec.slide_path, stop)
            )
        except AnalysisCancelledError:
            return
        except OSError:  # the analysis reports the slide's own error
            yield from compute()
            return
        key = analysis_key(spec, content, self.model, self.code)
        while True:
            found = self.store.lookup(key, spec.request_id)
            if found.entry is not None:
                self._result("hit")
                log.info(
                    "result cache hit",
                    extra={"request_id": spec.request_id, "events": found.entry.records},
                )
                yield from replay(found.entry, spec.request_id, t0)
                return
            if self.store.lead(key, stop):
                break
            if stop.is_set():
                return
        self._result("miss")
        try:
            yield from self._store_as_sent(key, compute(), stop)
        finally:
            self.store.land(key)

    def _store_as_sent(
        self, key: str, messages: Iterator[pb.AnalyzeSlideResponse], stop: threading.Event
    ) -> Iterator[pb.AnalyzeSlideResponse]:
        writer = self.store.writer(key)
        completed = False
        try:
            for message in messages:
                yield message
                # Serialised and written once the message is sent, between events.
                writer.add(message.SerializeToString())
                completed = message.WhichOneof("event") == "completed"
        except BaseException:
            writer.abort()
            raise
        if completed and not stop.is_set():
            if self.store.store(writer):
                log.info("result cache stored", extra={"size_bytes": writer.size})
        else:
            writer.abort()


def replay(entry: Entry, request_id: str, t0: float) -> Iterator[pb.AnalyzeSlideResponse]:
    """A stored stream as this call's: the same events in the same order, arrays
    untouched; the request id and the timings that describe a call are this call's.

    On a hit, AnalysisStarted.tiling_s and Timings.tiling_s are the lookup (hashing,
    verification); progress elapsed_s, first_result_s and total_s are this call's;
    inference_s and aggregate_s are 0; patches_per_s is patches sent per second of
    this call; AnalysisCompleted.cached is true. Closes ``entry``.
    """
    lookup_s = time.perf_counter() - t0
    first_result_s = 0.0
    sent = 0
    with entry:
        for record in entry.events():
            msg = pb.AnalyzeSlideResponse.FromString(record)
            kind = msg.WhichOneof("event")
            now_s = time.perf_counter() - t0
            if kind == "started":
                msg.started.request_id = request_id
                msg.started.tiling_s = lookup_s
            elif kind == "patches":
                sent += len(msg.patches.patch_index)
                if not first_result_s and len(msg.patches.patch_index):
                    first_result_s = now_s
            elif kind == "progress":
                msg.progress.elapsed_s = now_s
            elif kind == "completed":
                done = msg.completed
                done.request_id = request_id
                done.cached = True
                done.timings.CopyFrom(
                    pb.Timings(
                        tiling_s=lookup_s,
                        first_result_s=first_result_s,
                        inference_s=0.0,
                        aggregate_s=0.0,
                        total_s=now_s,
                        patches_per_s=sent / max(now_s, 1e-9),
                    )
                )
            yield msg


def model_identity(runtime: ModelRuntime, artifact: Path | None, concurrency: int) -> ModelIdentity:
    """The served model's :class:`ModelIdentity`; the artifact file is hashed here
    (once, at load), or the manifest JSON where the runtime came from no file."""
    if artifact is not None and artifact.is_file():
        artifact_sha256 = file_sha256(artifact)
    else:
        artifact_sha256 = hashlib.sha256(runtime.manifest.model_dump_json().encode()).hexdigest()
    return ModelIdentity(
        artifact_sha256, runtime.engine, runtime.precision, runtime.device, concurrency
    )
