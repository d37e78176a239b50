"""Which transfer syntax the frames of a DICOMweb series are fetched in: the one they
are stored in, so that a PACS never transcodes them.

wsidicom 0.31 (``WsiDicom.open_web``) asks the PACS for each instance's frames in its
own order of preference, JPEG baseline first, and takes the first one the PACS serves.
A PACS that transcodes (Orthanc does) then serves a JPEG-LS, RLE or uncompressed series
re-encoded as lossy JPEG (the pixels differ from the same files read locally), and one
that cannot transcode JPEG 2000 answers HTTP 500 ("Cannot transcode image"), which
wsidicom does not take for "not supported" (only 406), so the series never opened.

:class:`SeriesClient` answers wsidicom's "is this transfer syntax served?" for each
instance with exactly one syntax:

1. the one the instance is stored in, from its WADO-RS metadata (Transfer Syntax UID
   (0002,0010), where the PACS sends it) or else from the first frame fetched "as
   stored" (``Accept: ...; transfer-syntax=*``, PS3.18 8.7.3.5.2: the PACS names the
   syntax in the response's Content-Type), when our decoders (wsidicom's codecs) read it;
2. otherwise the first syntax our decoders read that the PACS serves, in wsidicom's
   order except where the metadata points at the stored syntax (:func:`probe_order`);
   any HTTP error but 401/403 while probing one (Orthanc: 500) means "not served"
   (never PACS_UNAVAILABLE).

The PACS's QIDO-RS Available Transfer Syntax UID (0008,3002) is not used: it lists
what the PACS can transcode to, not what it stores. After opening, :meth:`SeriesClient.refusal`
says in words why a series has nothing to analyse (no VOLUME image; a pyramid served in
no syntax we decode).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from histohelper.errors import UnsupportedSlideError
from histohelper.server.tiling.dicom import NO_PYRAMID

#: The Accept header of a frame request that asks for the frame as stored.
AS_STORED_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
_SYNTAX_PARAM = re.compile(r"transfer-syntax=\"?([0-9]+(?:\.[0-9]+)*)")
#: Bytes of a multipart body read at most to find the first part's headers.
_MAX_PART_HEADER_BYTES = 16384
#: Lossless transfer syntaxes (tried first when the stored one is unknown and the
#: instance says Lossy Image Compression "00").
LOSSLESS_SYNTAXES = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.1",  # explicit VR little endian (uncompressed)
)
_MISSING = object()


def syntax_name(uid: str) -> str:
    """``"JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)"``: pydicom's name of a
    transfer syntax and its UID (the UID alone when pydicom does not know it)."""
    from pydicom.uid import UID

    name = UID(uid).name
    return uid if name == uid else f"{name} ({uid})"


def stored_transfer_syntax(session: Any, frame_url: str) -> str | None:
    """The transfer syntax a PACS stores an instance in, from its first frame fetched
    "as stored" (``transfer-syntax=*``).

    Args:
        session: a ``requests.Session`` with the PACS's credentials.
        frame_url: ``.../studies/S/series/S/instances/I/frames/1``.

    Returns:
        The Transfer Syntax UID the response names (in its Content-Type or its first
        part's Content-Type), or None when the PACS does not serve frames as stored
        (any HTTP error but 401/403) or names no syntax.

    Raises:
        requests.HTTPError: 401 or 403 (credentials refused).
        requests.RequestException: the PACS cannot be reached or timed out.
    """
    response = session.get(frame_url, headers={"Accept": AS_STORED_ACCEPT}, stream=True)
    try:
        if response.status_code in (401, 403):
            response.raise_for_status()
        if response.status_code != 200:
            return None
        found = _SYNTAX_PARAM.search(response.headers.get("Content-Type", ""))
        if found is None:  # the standard's place: the part's own Content-Type
            head = b""
            for chunk in response.iter_content(4096):
                head += chunk
                if head.count(b"\r\n\r\n") or len(head) >= _MAX_PART_HEADER_BYTES:
                    break
            found = _SYNTAX_PARAM.search(head.split(b"\r\n\r\n")[0].decode("latin-1"))
        return found.group(1) if found else None
    finally:
        response.close()


def probe_order(preferred: list[str], dataset: Any) -> list[str]:
    """The order to ask a PACS for an instance's frames in when the stored transfer
    syntax is unknown: wsidicom's order (JPEG baseline first), except that an instance
    whose metadata points at its syntax has those first.

    Args:
        preferred: wsidicom's order of preference (UIDs).
        dataset: the instance's metadata (pydicom), or None.

    Returns:
        ``preferred`` reordered: JPEG 2000 first for Photometric Interpretation
        YBR_ICT (lossy) or YBR_RCT (lossless), which only JPEG 2000 uses; lossless
        syntaxes first for Lossy Image Compression "00" (never lossy compressed), so
        that the PACS adds no lossy generation. Otherwise unchanged: RGB is used by
        JPEG baseline (Aperio tiles copied) as much as by lossless syntaxes.
    """
    photometric = str(getattr(dataset, "PhotometricInterpretation", "") or "")
    lossless = str(getattr(dataset, "LossyImageCompression", "") or "") == "00"
    first: tuple[str, ...] = ()
    if photometric == "YBR_ICT":
        first = ("1.2.840.10008.1.2.4.91",)
    elif photometric == "YBR_RCT" or lossless:
        first = ("1.2.840.10008.1.2.4.90",) if photometric == "YBR_RCT" else LOSSLESS_SYNTAXES
    return sorted(
        preferred, key=lambda uid: (uid not in first, first.index(uid) if uid in first else 0)
    )


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def series_client(
    client: Any, session: Any, frame_url: Callable[[str, str, str], str], server: str
) -> Any:
    """A :class:`SeriesClient` (wsidicom's DICOMweb client, defined on first use so that
    importing this module imports no wsidicom).

    Args:
        client: the ``dicomweb_client.DICOMwebClient`` of the PACS.
        session: a ``requests.Session`` with the same credentials (for "as stored" requests).
        frame_url: ``(study, series, instance) -> URL of frame 1``.
        server: the configured server name (for messages).
    """
    return _client_class()(client, session, frame_url, server)


@functools.cache
def _client_class() -> type:
    from pydicom import Dataset
    from pydicom.uid import UID
    from requests import HTTPError
    from wsidicom import WsiDicomWebClient
    from wsidicom.codec import Codec
    from wsidicom.instance import WsiDataset
    from wsidicom.metadata import ImageType
    from wsidicom.web.wsidicom_web_source import PREFERED_WEB_TRANSFER_SYNTAXES

    def unfetched_bulk_data(tag: Any, vr: str, uri: str) -> bytes:
        """pydicom's ``bulk_data_uri_handler`` that fetches nothing: an empty value."""
        return b""

    class SeriesClient(WsiDicomWebClient):
        """wsidicom's DICOMweb client that fetches frames as stored (module docstring)
        and leaves bulk data in instance metadata unfetched.

        A PACS's WADO-RS metadata gives bulk values as ``BulkDataURI`` (PS3.18 F.2.6):
        in a VL WSI instance only the optical path's ICC profile, which the analysis
        does not apply. wsidicom's own client parses the JSON without a handler, so
        pydicom warned on every instance opened; this one leaves the value empty.
        """

        def __init__(
            self,
            client: Any,
            session: Any,
            frame_url: Callable[[str, str, str], str],
            server: str,
        ) -> None:
            super().__init__(client)
            self._session = session
            self._frame_url = frame_url
            self._server = server
            self._lock = threading.Lock()
            self._datasets: dict[str, Dataset] = {}
            self._stored: dict[str, str | None] = {}
            self._chosen: dict[str, Any] = {}

        def get_instance(self, study_uid: Any, series_uid: Any, instance_uid: Any) -> Dataset:
            found = self._client.retrieve_instance_metadata(study_uid, series_uid, instance_uid)
            dataset = Dataset.from_json(found, bulk_data_uri_handler=unfetched_bulk_data)
            with self._lock:
                self._datasets[str(instance_uid)] = dataset
            return dataset

        def get_wsi_instances(
            self, study_uid: Any, series_uids: Iterable[Any]
        ) -> Iterator[tuple[Any, Any, set[Any] | None]]:
            # Available Transfer Syntax UID lists what the PACS transcodes to: dropped,
            # so that every instance's syntax is chosen by is_transfer_syntax_supported.
            for series_uid, instance_uid, _ in super().get_wsi_instances(study_uid, series_uids):
                yield series_uid, instance_uid, None

        def is_transfer_syntax_supported(
            self, study_uid: Any, series_uid: Any, instance_uid: Any, transfer_syntax: Any
        ) -> bool:
            key = str(instance_uid)
            with self._lock:
                chosen = self._chosen.get(key, _MISSING)
            if chosen is _MISSING:
                chosen = self._choose(str(study_uid), str(series_uid), key)
                with self._lock:
                    self._chosen[key] = chosen
            return chosen is not None and str(transfer_syntax) == str(chosen)

        def _choose(self, study: str, series: str, instance: str) -> Any:
            with self._lock:
                dataset = self._datasets.get(instance)
            stored = str(dataset.get("TransferSyntaxUID", "")) if dataset is not None else ""
            if not stored:
                stored = (
                    stored_transfer_syntax(self._session, self._frame_url(study, series, instance))
                    or ""
                )
            with self._lock:
                self._stored[instance] = stored or None
            if stored and self._decodable(stored, dataset):
                return UID(stored)
            order = probe_order([str(uid) for uid in PREFERED_WEB_TRANSFER_SYNTAXES], dataset)
            for syntax in order:
                if syntax == stored or not self._decodable(syntax, dataset):
                    continue
                try:
                    if super().is_transfer_syntax_supported(study, series, instance, UID(syntax)):
                        return UID(syntax)
                except HTTPError as exc:
                    if _status(exc) in (401, 403):
                        raise
            return None

        @staticmethod
        def _decodable(syntax: str, dataset: Dataset | None) -> bool:
            """True when wsidicom asks for ``syntax`` and one of its codecs decodes it
            for this instance's samples, bits and photometric interpretation."""
            if syntax not in {str(uid) for uid in PREFERED_WEB_TRANSFER_SYNTAXES}:
                return False
            if dataset is None:
                return True
            try:
                return bool(
                    Codec.is_supported(
                        UID(syntax),
                        int(dataset.SamplesPerPixel),
                        int(dataset.BitsStored),
                        str(dataset.PhotometricInterpretation),
                    )
                )
            except (AttributeError, TypeError, ValueError):
                return False

        def refusal(self) -> UnsupportedSlideError | None:
            """Why the opened series holds nothing to analyse, or None.

            Returns:
                SLIDE_UNSUPPORTED when none of its instances is a VOLUME (pyramid) image
                (only label, overview or thumbnail), or when the PACS serves none of its
                VOLUME instances in a transfer syntax our decoders read (naming the
                syntax they are stored in).
            """
            with self._lock:
                datasets = dict(self._datasets)
                chosen = dict(self._chosen)
                stored = dict(self._stored)
            volumes = [
                uid
                for uid, ds in datasets.items()
                if WsiDataset.is_supported_wsi_dicom(ds) == ImageType.VOLUME
            ]
            if datasets and not volumes:
                return UnsupportedSlideError(NO_PYRAMID)
            if not volumes or any(chosen.get(uid) is not None for uid in volumes):
                return None
            syntaxes = sorted({stored.get(uid) or "" for uid in volumes})
            named = (
                ", ".join(syntax_name(s) for s in syntaxes if s)
                or "a transfer syntax it did not name"
            )
            return UnsupportedSlideError(
                f"the series' pyramid is stored as {named}, which this server cannot "
                f"decode, and the DICOMweb server {self._server!r} serves it in no transfer "
                "syntax this server decodes"
            )

    return SeriesClient
