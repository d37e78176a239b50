"""The HistoHelper error family and its one table of gRPC status codes.

Every error the project raises on purpose derives from :class:`HistoHelperError`.
Each subclass fixes a gRPC status code (by name, so this module needs no grpc) and a
machine-readable ``reason`` (``UPPER_SNAKE_CASE``), sent to clients as a
``google.rpc.ErrorInfo`` detail in domain :data:`ERROR_DOMAIN`. The client maps the
reason back to the same class (:func:`error_class_for`), so ``except
SlideNotFoundError`` works on both sides of the wire.

Messages must never carry server paths or slide file names (they may hold patient
identifiers): say "the slide", not where it is.

This module imports only the standard library.
"""

from __future__ import annotations

from typing import ClassVar

ERROR_DOMAIN = "histohelper.v1"


class HistoHelperError(Exception):
    """Base class of every error HistoHelper raises on purpose.

    Attributes:
        code: gRPC status code name (``grpc.StatusCode`` member name), fixed per class.
        reason: stable machine-readable reason, fixed per class.
        message: human-readable message, safe to show to a remote caller.
        metadata: extra string key/values for ``google.rpc.ErrorInfo.metadata``.
    """

    code: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = {k: str(v) for k, v in metadata.items()}

    def __str__(self) -> str:
        return self.message


# --- slides -------------------------------------------------------------------------


class SlideError(HistoHelperError):
    """Base class of errors about one slide."""

    code = "INVALID_ARGUMENT"
    reason = "SLIDE_ERROR"


class SlideNotFoundError(SlideError):
    """The slide does not exist (under the slide root, or as an upload id)."""

    code = "NOT_FOUND"
    reason = "SLIDE_NOT_FOUND"


class UnsupportedSlideError(SlideError):
    """The file is not a slide OpenSlide can read (format, compression, pixel type)."""

    code = "INVALID_ARGUMENT"
    reason = "SLIDE_UNSUPPORTED"


class CorruptSlideError(SlideError):
    """The slide opened, but its pixel data cannot be decoded (too many failed reads)."""

    code = "DATA_LOSS"
    reason = "SLIDE_CORRUPT"


class RegionOutOfBoundsError(SlideError):
    """A requested region or level lies outside the slide."""

    code = "OUT_OF_RANGE"
    reason = "REGION_OUT_OF_BOUNDS"


class SlideTooLargeError(SlideError):
    """The slide (or an upload) exceeds a configured limit, e.g. patches per slide."""

    code = "RESOURCE_EXHAUSTED"
    reason = "SLIDE_TOO_LARGE"


class SlidePathError(SlideError):
    """The slide reference is malformed: absolute, contains ``..``, empty, or NUL."""

    code = "INVALID_ARGUMENT"
    reason = "SLIDE_PATH_INVALID"


class SlidePathDeniedError(SlideError):
    """The slide reference resolves outside the slide root (e.g. through a symlink)."""

    code = "PERMISSION_DENIED"
    reason = "SLIDE_PATH_DENIED"


# --- requests and options -----------------------------------------------------------


class InvalidOptionsError(HistoHelperError):
    """A request option is out of range or inconsistent."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_OPTIONS"


class InvalidImageError(HistoHelperError):
    """A client-supplied patch image cannot be decoded or has the wrong shape."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_IMAGE"


class EmptyBagError(HistoHelperError):
    """MIL aggregation was asked for a bag of zero instances."""

    code = "INVALID_ARGUMENT"
    reason = "EMPTY_BAG"


# --- models and artifacts -----------------------------------------------------------


class ModelArtifactError(HistoHelperError):
    """A model artifact is missing, unreadable, or its manifest is invalid."""

    code = "FAILED_PRECONDITION"
    reason = "MODEL_ARTIFACT_INVALID"


class WeightsError(HistoHelperError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""

    code = "INVALID_ARGUMENT"
    reason = "WEIGHTS_MISMATCH"


class ParityError(HistoHelperError):
    """An exported artifact does not reproduce the eager model within tolerance."""

    code = "INTERNAL"
    reason = "PARITY_FAILED"


class ModelNotFoundError(HistoHelperError):
    """A request named a model or version the server's repository does not hold."""

    code = "NOT_FOUND"
    reason = "MODEL_NOT_FOUND"


class ModelLoadError(HistoHelperError):
    """A model version failed to load or its parity gate; the previous state serves."""

    code = "FAILED_PRECONDITION"
    reason = "MODEL_LOAD_FAILED"


class ModelInUseError(HistoHelperError):
    """A model version cannot be unloaded: it is a default or has calls in flight."""

    code = "FAILED_PRECONDITION"
    reason = "MODEL_IN_USE"


# --- DICOM and DICOMweb (PACS) --------------------------------------------------------


class DicomWebNotConfiguredError(HistoHelperError):
    """A request named a DICOMweb server the operator did not configure
    (``serve --dicomweb NAME=URL``); requests never carry URLs."""

    code = "INVALID_ARGUMENT"
    reason = "DICOMWEB_NOT_CONFIGURED"


class DicomInvalidError(HistoHelperError):
    """Bytes sent to be stored are not a valid DICOM Part 10 instance."""

    code = "INVALID_ARGUMENT"
    reason = "DICOM_INVALID"


class PacsUnavailableError(HistoHelperError):
    """A configured DICOMweb server could not be reached or timed out; retry later."""

    code = "UNAVAILABLE"
    reason = "PACS_UNAVAILABLE"


class PacsPermissionDeniedError(HistoHelperError):
    """A configured DICOMweb server refused the operator's credentials (401/403)."""

    code = "PERMISSION_DENIED"
    reason = "PACS_PERMISSION_DENIED"


class PacsTlsError(HistoHelperError):
    """The HTTPS connection to a configured DICOMweb server failed TLS: its certificate
    is not trusted by ``NAME.ca.pem`` (or the system CAs) or does not name the host.
    A configuration problem for the operator; retrying does not help."""

    code = "FAILED_PRECONDITION"
    reason = "PACS_TLS_FAILED"


# --- service ------------------------------------------------------------------------


class ServerBusyError(HistoHelperError):
    """The server is at its limit of concurrent analyses; retry later."""

    code = "RESOURCE_EXHAUSTED"
    reason = "SERVER_BUSY"


class AnalysisCancelledError(HistoHelperError):
    """The caller cancelled the analysis."""

    code = "CANCELLED"
    reason = "CANCELLED"


class DeadlineExceededError(HistoHelperError):
    """The request's deadline passed before the analysis finished."""

    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class UnauthenticatedError(HistoHelperError):
    """No valid credentials were presented."""

    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDeniedError(HistoHelperError):
    """The caller is known but not allowed to do this."""

    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class ServerUnavailableError(HistoHelperError):
    """The server cannot be reached or is shutting down (client side)."""

    code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class UploadError(HistoHelperError):
    """An UploadSlide stream is malformed: no metadata first, bad suffix or size,
    a chunk too large, or fewer/more bytes than declared."""

    code = "INVALID_ARGUMENT"
    reason = "UPLOAD_INVALID"


class UploadChecksumError(UploadError):
    """The uploaded bytes do not hash to the declared SHA-256 (corrupted in transit)."""

    code = "DATA_LOSS"
    reason = "UPLOAD_CHECKSUM_MISMATCH"


class UploadQuotaError(UploadError):
    """The upload area's quota (bytes, or concurrent uploads) is used up; retry later."""

    code = "RESOURCE_EXHAUSTED"
    reason = "UPLOAD_QUOTA_EXCEEDED"


class PixelBudgetExceededError(HistoHelperError):
    """Client-supplied images would decode to more pixels than the server allows per
    ClassifyPatches request or per stream (counted from the image headers before any
    pixel is decoded); send fewer or smaller images."""

    code = "RESOURCE_EXHAUSTED"
    reason = "PIXEL_BUDGET_EXCEEDED"


class MalformedRequestError(HistoHelperError):
    """A request message could not be decoded as the RPC's protobuf type."""

    code = "INVALID_ARGUMENT"
    reason = "MALFORMED_REQUEST"


class StreamStalledError(HistoHelperError):
    """A stream's client neither took nor sent a message for the server's stall limit
    (``--stalled-stream-s``); the server ended the call and freed its slot."""

    code = "DEADLINE_EXCEEDED"
    reason = "STREAM_STALLED"


class InternalError(HistoHelperError):
    """An unexpected server fault. The message carries a request id, never a traceback."""

    code = "INTERNAL"
    reason = "INTERNAL"


def _all_subclasses(cls: type[HistoHelperError]) -> list[type[HistoHelperError]]:
    out: list[type[HistoHelperError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_table() -> dict[str, type[HistoHelperError]]:
    """Return the one table: ``reason -> error class`` for every concrete error.

    Returns:
        A dict keyed by ``reason``; each class's ``code`` gives its gRPC status.
    """
    table: dict[str, type[HistoHelperError]] = {}
    classes: list[type[HistoHelperError]] = [HistoHelperError, *_all_subclasses(HistoHelperError)]
    for cls in classes:
        table.setdefault(cls.reason, cls)
    return table


def error_class_for(reason: str | None, code: str) -> type[HistoHelperError]:
    """Map a remote error back to its class.

    Args:
        reason: ``ErrorInfo.reason`` from the status details, if any.
        code: gRPC status code name, used when the reason is missing or unknown.

    Returns:
        The matching class; for an unknown reason, the first class with that code,
        else :class:`HistoHelperError`.
    """
    table = error_table()
    if reason and reason in table:
        return table[reason]
    by_code = {
        "NOT_FOUND": SlideNotFoundError,
        "INVALID_ARGUMENT": InvalidOptionsError,
        "DATA_LOSS": CorruptSlideError,
        "RESOURCE_EXHAUSTED": ServerBusyError,
        "CANCELLED": AnalysisCancelledError,
        "DEADLINE_EXCEEDED": DeadlineExceededError,
        "UNAUTHENTICATED": UnauthenticatedError,
        "PERMISSION_DENIED": PermissionDeniedError,
        "UNAVAILABLE": ServerUnavailableError,
        "FAILED_PRECONDITION": ModelArtifactError,
        "OUT_OF_RANGE": RegionOutOfBoundsError,
        "INTERNAL": InternalError,
    }
    return by_code.get(code, HistoHelperError)
