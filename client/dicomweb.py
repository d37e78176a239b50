"""DICOMweb slide references: ``dicomweb://NAME/STUDY_UID/SERIES_UID``.

A DICOM VL Whole Slide Microscopy Image series on a PACS the server's operator
configured (``serve --dicomweb NAME=URL``) is named on the CLI and in the SDK by a
URI whose host is the configured NAME (never a URL: the server refuses names it does
not know, and requests never carry URLs or credentials) and whose two path segments
are the Study and Series Instance UIDs. :func:`slide_ref` turns any slide argument
(a path under the server's slide root, an upload, a :class:`DicomWebSlide` or such a
URI) into the one source field of a request.

UIDs identify a patient's study: they never become file or folder names here
(:meth:`DicomWebSlide.safe_id` is ``NAME-<12 hex of the URI's SHA-256>``) and the
client never logs them.

:func:`store_requests` builds the request stream of ``StoreDicom`` (result objects
sent back to the PACS the slide came from).

Stdlib and the generated protobuf only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING

from histohelper.errors import SlidePathError
from histohelper.v1 import slide_analysis_pb2 as pb

if TYPE_CHECKING:
    from histohelper.client.uploads import UploadedSlide

SCHEME = "dicomweb://"
#: A configured DICOMweb server's name: a letter or digit, then letters, digits, ``._-``.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: A DICOM UID (PS3.5 9.1): components of digits without leading zeros, joined by dots.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX_CHARS = 64


def is_dicomweb_uri(text: object) -> bool:
    """Whether ``text`` is a string that starts with ``dicomweb://`` (any case)."""
    return isinstance(text, str) and text[: len(SCHEME)].lower() == SCHEME


def check_uid(uid: str, what: str) -> str:
    """Return ``uid`` when it is a DICOM UID: digits and dots, components without leading
    zeros, at most 64 characters.

    Raises:
        SlidePathError: otherwise; the message names ``what`` but never echoes the value.
    """
    if not uid:
        raise SlidePathError(f"dicomweb:// slide URI: the {what} is missing")
    if len(uid) > UID_MAX_CHARS or not _UID_RE.fullmatch(uid):
        raise SlidePathError(
            f"dicomweb:// slide URI: the {what} is not a DICOM UID (digits and dots, "
            f"no leading zeros in a component, at most {UID_MAX_CHARS} characters)"
        )
    return uid


@dataclass(frozen=True, slots=True)
class DicomWebSlide:
    """A whole-slide image series on a DICOMweb server the operator configured.

    Attributes:
        server: the configured server's NAME (``serve --dicomweb NAME=URL``).
        study_instance_uid, series_instance_uid: DICOM UIDs of the series.

    Raises:
        SlidePathError: on construction, for a malformed name or UID.
    """

    server: str
    study_instance_uid: str
    series_instance_uid: str

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.server):
            raise SlidePathError(
                "dicomweb:// slide URI: the server NAME must be one the operator configured "
                "(a letter or digit, then letters, digits, '.', '_' or '-'; at most 64 "
                "characters), not a URL"
            )
        check_uid(self.study_instance_uid, "study instance UID")
        check_uid(self.series_instance_uid, "series instance UID")

    @classmethod
    def parse(cls, uri: str) -> DicomWebSlide:
        """Parse ``dicomweb://NAME/STUDY_UID/SERIES_UID`` (a trailing ``/`` is allowed).

        Raises:
            SlidePathError: not that shape (the message says which part is wrong).
        """
        if not is_dicomweb_uri(uri):
            raise SlidePathError("a DICOMweb slide is written dicomweb://NAME/STUDY_UID/SERIES_UID")
        rest = uri[len(SCHEME) :]
        if rest.endswith("/"):
            rest = rest[:-1]
        if "?" in rest or "#" in rest or "@" in rest or ":" in rest:
            raise SlidePathError(
                "dicomweb:// slide URI: no user, port, query or fragment; write "
                "dicomweb://NAME/STUDY_UID/SERIES_UID with NAME a server the operator configured"
            )
        parts = rest.split("/")
        if len(parts) != 3:
            raise SlidePathError(
                f"dicomweb:// slide URI has {len(parts)} part(s) after the scheme, expected 3: "
                "dicomweb://NAME/STUDY_UID/SERIES_UID"
            )
        return cls(*parts)

    @property
    def uri(self) -> str:
        """``dicomweb://NAME/STUDY_UID/SERIES_UID``."""
        return f"{SCHEME}{self.server}/{self.study_instance_uid}/{self.series_instance_uid}"

    def __str__(self) -> str:
        return self.uri

    def safe_id(self) -> str:
        """A file-name-safe id without UIDs: ``NAME-<first 12 hex of SHA-256 of the URI>``."""
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        return f"{self.server}-{digest}"

    def to_proto(self) -> pb.DicomWebSeries:
        """The wire message (``AnalyzeSlideRequest.dicomweb``)."""
        return pb.DicomWebSeries(
            server=self.server,
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
        )


def slide_ref(
    slide: str | PurePath | UploadedSlide | DicomWebSlide,
) -> tuple[str, str | pb.DicomWebSeries]:
    """The source field of an ``AnalyzeSlideRequest`` / ``ExplainPatchesRequest``.

    Args:
        slide: a path under the server's slide root ("/"-separated; a ``PurePath`` is
            converted with ``as_posix()``), an
            :class:`~histohelper.client.uploads.UploadedSlide`, a :class:`DicomWebSlide`,
            or a ``dicomweb://NAME/STUDY_UID/SERIES_UID`` string.

    Returns:
        ``(field name, value)``: ``("slide_path", str)``, ``("upload_id", str)`` or
        ``("dicomweb", DicomWebSeries)``.

    Raises:
        SlidePathError: a malformed ``dicomweb://`` URI.
    """
    from histohelper.client.uploads import UploadedSlide

    if isinstance(slide, UploadedSlide):
        return "upload_id", slide.upload_id
    if isinstance(slide, DicomWebSlide):
        return "dicomweb", slide.to_proto()
    if isinstance(slide, PurePath):
        return "slide_path", slide.as_posix()
    text = str(slide)
    if is_dicomweb_uri(text):
        return "dicomweb", DicomWebSlide.parse(text).to_proto()
    return "slide_path", text


#: A path component that is a DICOM UID (4+ numeric components: wsidicomizer and PACS
#: exports name files and folders by SOP/Series/Study Instance UID), with an extension.
_UID_COMPONENT = re.compile(r"(?P<uid>[0-9]+(?:\.[0-9]+){3,})(?P<ext>\.[A-Za-z][A-Za-z0-9]*)?")


def _without_uids(path: str) -> str:
    """``path`` with each component that is a DICOM UID shown as ``dicom-<first 12 hex
    of its SHA-256>`` (extension kept), so distinct files stay distinct."""

    def mask(part: str) -> str:
        found = _UID_COMPONENT.fullmatch(part)
        if found is None:
            return part
        digest = hashlib.sha256(found["uid"].encode()).hexdigest()[:12]
        return f"dicom-{digest}{found['ext'] or ''}"

    return "/".join(mask(part) for part in path.split("/"))


def display_name(slide: object) -> str:
    """How consoles show a slide argument: a DICOMweb series by its
    :meth:`DicomWebSlide.safe_id` (UIDs stay out of consoles and their logs), a path
    with each component that is a DICOM UID (a local ``.dcm`` named by its SOP Instance
    UID) as ``dicom-<12 hex>``, anything else as given (a malformed URI as
    ``"dicomweb://..."``)."""
    if not is_dicomweb_uri(slide):
        return _without_uids(str(slide))
    try:
        return DicomWebSlide.parse(str(slide)).safe_id()
    except SlidePathError:
        return SCHEME + "..."


def as_dicomweb(slide: object) -> DicomWebSlide | None:
    """The :class:`DicomWebSlide` a slide argument names, or ``None`` for other sources.

    Raises:
        SlidePathError: a malformed ``dicomweb://`` URI.
    """
    if isinstance(slide, DicomWebSlide):
        return slide
    if is_dicomweb_uri(slide):
        return DicomWebSlide.parse(str(slide))
    return None


# --- StoreDicom -----------------------------------------------------------------------

#: Bytes per StoreDicomRequest chunk (the server accepts at most 1 MiB).
STORE_CHUNK_BYTES = 1024 * 1024
#: Largest instance the server accepts, bytes.
STORE_MAX_INSTANCE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredDicom:
    """Answer of ``StoreDicom``: the DICOMweb server stored to and the SOP Instance UIDs
    it stored, in the order sent."""

    dicomweb_server: str
    sop_instance_uids: tuple[str, ...]

    @classmethod
    def from_proto(cls, msg: pb.StoreDicomResponse) -> StoredDicom:
        """Convert the wire response."""
        return cls(msg.dicomweb_server, tuple(msg.sop_instance_uids))


def instance_bytes(instance: object) -> bytes:
    """One DICOM instance as Part 10 bytes.

    Args:
        instance: Part 10 ``bytes``, a path to a Part 10 file, or a pydicom Dataset
            (e.g. a highdicom object; serialised with its file meta).

    Raises:
        OSError: a path that cannot be read.
        TypeError: anything else.
    """
    if isinstance(instance, bytes | bytearray | memoryview):
        return bytes(instance)
    if isinstance(instance, str | PurePath):
        with open(instance, "rb") as fh:
            return fh.read()
    if hasattr(instance, "save_as"):  # a pydicom Dataset; pydicom imported by its owner
        import io

        buf = io.BytesIO()
        instance.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    raise TypeError(f"cannot store a {type(instance).__name__} as a DICOM instance")


def store_requests(
    server: str, instances: Iterable[object], chunk_bytes: int = STORE_CHUNK_BYTES
) -> Iterator[pb.StoreDicomRequest]:
    """The request stream of one ``StoreDicom`` call: the server's name, then per instance
    its size and its bytes in chunks of at most ``chunk_bytes``.

    Args:
        server: the configured DICOMweb server's NAME (e.g. ``DicomSource.dicomweb_server``).
        instances: as :func:`instance_bytes` takes them; read one at a time.
        chunk_bytes: bytes per chunk, in [1, 1 MiB].

    Raises:
        ValueError: a bad name or chunk size, an empty instance or one over 256 MiB.
    """
    if not _NAME_RE.fullmatch(server):
        raise ValueError("the DICOMweb server must be the NAME the operator configured")
    if not 1 <= chunk_bytes <= STORE_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [1, {STORE_CHUNK_BYTES}]")
    yield pb.StoreDicomRequest(dicomweb_server=server)
    for instance in instances:
        data = instance_bytes(instance)
        if not 0 < len(data) <= STORE_MAX_INSTANCE_BYTES:
            raise ValueError(
                f"a DICOM instance of {len(data)} bytes cannot be stored (1 B .. 256 MiB)"
            )
        yield pb.StoreDicomRequest(instance_size_bytes=len(data))
        for start in range(0, len(data), chunk_bytes):
            yield pb.StoreDicomRequest(chunk=data[start : start + chunk_bytes])
