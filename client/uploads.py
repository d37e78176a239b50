"""Slide uploads (``UploadSlide``) for callers without the server's filesystem.

:func:`upload_requests` turns a file or bytes into the request stream (metadata, then
1 MiB chunks); the file's name never leaves the client, only its suffix (OpenSlide
needs it). The result, :class:`UploadedSlide`, can be passed wherever a slide path
goes (``client.analyze(client.upload("slide.svs"))``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from histohelper.v1 import slide_analysis_pb2 as pb

#: Bytes per UploadSlideRequest chunk (the server accepts at most 1 MiB).
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class UploadedSlide:
    """A slide stored in the server's upload area, referenced by its opaque id.

    Attributes:
        upload_id: the server's handle (only the uploading caller can use it).
        size_bytes: stored size.
        sha256_hex: SHA-256 of the stored bytes (checked by the server).
        expires_in_s: seconds until the server deletes it (renewed by each use).
    """

    upload_id: str
    size_bytes: int = 0
    sha256_hex: str = ""
    expires_in_s: float = 0.0

    @classmethod
    def from_proto(cls, msg: pb.UploadSlideResponse) -> UploadedSlide:
        """Convert the wire response."""
        return cls(msg.upload_id, msg.size_bytes, msg.sha256_hex, msg.expires_in_s)


def _sha256_of(source: Path | bytes) -> tuple[int, str]:
    if isinstance(source, bytes):
        return len(source), hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with source.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return source.stat().st_size, digest.hexdigest()


def upload_requests(
    source: str | os.PathLike[str] | bytes,
    suffix: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.UploadSlideRequest]:
    """The request stream of one upload: metadata first, then the bytes in chunks.

    Args:
        source: a slide file, or its bytes.
        suffix: file suffix such as ``".svs"``; default: the file's own (required for bytes).
        chunk_bytes: bytes per chunk, in [1, 1 MiB].

    Raises:
        ValueError: bytes without a suffix, or a bad chunk size.
        OSError: the file cannot be read.
    """
    if not 1 <= chunk_bytes <= CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [1, {CHUNK_BYTES}]")
    data = source if isinstance(source, bytes) else None
    path = None if data is not None else Path(os.fspath(source))  # type: ignore[arg-type]
    if suffix is None:
        if path is None:
            raise ValueError("uploading bytes needs a suffix such as '.svs'")
        suffix = path.suffix
    size, sha256_hex = _sha256_of(data if data is not None else path)  # type: ignore[arg-type]
    yield pb.UploadSlideRequest(
        metadata=pb.UploadSlideMetadata(
            size_bytes=size, sha256_hex=sha256_hex, suffix=suffix.lower()
        )
    )
    if data is not None:
        for start in range(0, len(data), chunk_bytes):
            yield pb.UploadSlideRequest(chunk=data[start : start + chunk_bytes])
        return
    assert path is not None
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            yield pb.UploadSlideRequest(chunk=block)
