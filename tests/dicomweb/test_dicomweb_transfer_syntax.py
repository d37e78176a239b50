"""Series over DICOMweb are read in the transfer syntax they are stored in, and the
pool notices a series whose instances changed, against a real Orthanc.

Orthanc transcodes on request: asked for JPEG baseline (wsidicom's first choice) it
re-encoded a JPEG-LS series lossily (probabilities moved by up to 0.009), and for a
JPEG 2000 series it answered HTTP 500 "Cannot transcode image", which became a
retryable PACS_UNAVAILABLE that never went away (tester A, findings 1 and 2). The
series here are ``CMU-1-Small-Region.svs`` converted by wsidicomizer with JPEG 2000
(lossy, 1.2.840.10008.1.2.4.91) and JPEG-LS lossless (1.2.840.10008.1.2.4.80, with the
missing pyramid levels added), once per module (~7 s).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_support import DicomWebSlide, stow
from pydicom.uid import generate_uid
from server_fixtures import inprocess_server
from test_dicomweb_service import _analyze, insecure_stub

from histohelper.errors import UnsupportedSlideError
from histohelper.server.dicomweb import DicomWebServers, parse_endpoints
from histohelper.server.tiling import PatchReader, TilingOptions, open_slide, plan_tiling
from histohelper.v1 import slide_analysis_pb2 as pb

SYNTAXES = {"j2k": "1.2.840.10008.1.2.4.91", "jpegls": "1.2.840.10008.1.2.4.80"}


def _encoder(kind: str) -> object:
    from wsidicom.codec import Jpeg2kSettings, JpegLsSettings

    return Jpeg2kSettings() if kind == "j2k" else JpegLsSettings()


@pytest.fixture(scope="module")
def converted(
    dicomweb_slide: DicomWebSlide, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str, str]]:
    """``{kind: (folder, study, series)}``: the real slide re-encoded by wsidicomizer
    and stored in the session's Orthanc."""
    from wsidicomizer import WsiDicomizer

    out = {}
    root = tmp_path_factory.mktemp("transfer-syntaxes")
    for kind in SYNTAXES:
        folder = root / kind
        WsiDicomizer.convert(
            dicomweb_slide.source_path,
            folder,
            include_label=False,
            include_overview=False,
            include_thumbnail=False,
            workers=1,
            encoding=_encoder(kind),
            force_transcoding=True,
            add_missing_levels=kind == "jpegls",
        )
        files = sorted(folder.glob("*.dcm"))
        stow(dicomweb_slide.server, files)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert str(first.file_meta.TransferSyntaxUID) == SYNTAXES[kind]
        out[kind] = (folder, str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
    return out


@pytest.fixture()
def servers(dicomweb_slide: DicomWebSlide) -> DicomWebServers:
    servers = DicomWebServers(parse_endpoints(f"pacs={dicomweb_slide.server.dicomweb_url}"))
    yield servers
    servers.close()


def _read_all(source: object, grid: object) -> np.ndarray:
    reader = PatchReader(source, grid, batch_size=16, num_workers=2)
    images = np.zeros((len(grid), 224, 224, 3), np.uint8)
    for batch in reader.iter_batches():
        assert batch.failed.size == 0
        images[batch.indices] = batch.images
    return images


@pytest.mark.parametrize("kind", list(SYNTAXES))
def test_series_read_over_dicomweb_equals_the_same_files_read_locally(
    kind: str, converted: dict[str, tuple[Path, str, str]], servers: DicomWebServers
) -> None:
    """Mask, grid and every patch equal the local files' exactly: the JPEG 2000 series
    opens at all (it failed with PACS_UNAVAILABLE), the lossless one is not re-encoded
    as lossy JPEG (its patches differed)."""
    folder, study, series = converted[kind]
    source = servers.source("pacs", study, series)
    local = next(iter(sorted(folder.glob("*.dcm"))))
    with open_slide(local) as files, open_slide(source) as web:
        assert web.metadata.level_dimensions == files.metadata.level_dimensions
        plan_files = plan_tiling(files, TilingOptions())
        plan_web = plan_tiling(web, TilingOptions())
        chosen = web.series.wsi.levels[0].default_instance.image_data.transfer_syntax
    assert str(chosen) == SYNTAXES[kind]
    assert len(plan_files.grid) > 0
    np.testing.assert_array_equal(plan_web.mask.mask, plan_files.mask.mask)
    np.testing.assert_array_equal(plan_web.grid.x_l0, plan_files.grid.x_l0)
    np.testing.assert_array_equal(plan_web.grid.y_l0, plan_files.grid.y_l0)
    np.testing.assert_array_equal(
        _read_all(source, plan_files.grid), _read_all(local, plan_files.grid)
    )


@pytest.fixture(scope="module")
def server(model_artifact: Path, served_runtime, dicomweb_slide: DicomWebSlide, converted):
    """A real in-process server whose slide root holds the converted folders and whose
    ``pacs`` is the session's Orthanc."""
    root = next(iter(converted.values()))[0].parent
    pacs = f"pacs={dicomweb_slide.server.dicomweb_url}"
    running = inprocess_server(model_artifact, served_runtime, root, dicomweb=pacs)
    yield running
    running.stop(grace=0, drain=0)


@pytest.mark.slow  # two analyses each, JPEG 2000 decoding on CPU: ~25-40 s on a busy CPU
@pytest.mark.parametrize("kind", list(SYNTAXES))
def test_analysis_over_dicomweb_equals_the_local_files(
    kind: str, converted: dict[str, tuple[Path, str, str]], server
) -> None:
    """AnalyzeSlide of the series from the PACS and of the same files under the slide
    root: the same patches with exactly the same probabilities."""
    folder, study, series = converted[kind]
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    web = pb.DicomWebSeries(server="pacs", study_instance_uid=study, series_instance_uid=series)
    started, probs, boxes = _analyze(stub, pb.AnalyzeSlideRequest(dicomweb=web))
    local = next(iter(sorted(folder.glob("*.dcm"))))
    _, ref_probs, ref_boxes = _analyze(
        stub, pb.AnalyzeSlideRequest(slide_path=f"{kind}/{local.name}")
    )
    assert started is not None and started.dicom.series_instance_uid == series
    assert len(probs) > 0
    assert boxes == ref_boxes
    assert probs == ref_probs


def _by_width(folder: Path) -> list[Path]:
    """The folder's instances, narrowest level first."""
    return sorted(
        folder.glob("*.dcm"),
        key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns),
    )


def _restore(
    files: list[Path], server: object, edit: Callable[[pydicom.Dataset], None] | None = None
) -> tuple[str, str]:
    """``files`` stored again as a new series (new series and instance UIDs, edited by
    ``edit``); returns (study, series) UIDs."""
    series = generate_uid()
    datasets = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if edit is not None:
            edit(ds)
        datasets.append(ds)
    stow(server, datasets)
    return str(datasets[0].StudyInstanceUID), series


def test_pooled_series_whose_instances_changed_is_opened_again(
    converted: dict[str, tuple[Path, str, str]],
    servers: DicomWebServers,
    dicomweb_slide: DicomWebSlide,
) -> None:
    """A series stored with its smallest level only, read (and pooled), then given its
    other levels by STOW-RS: the next read within the pool's lifetime sees the whole
    pyramid (the pool re-checks the SOP Instance UIDs, not only that the series exists)."""
    by_width = _by_width(converted["jpegls"][0])
    series = generate_uid()

    def same_series(ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = series

    study, _ = _restore(by_width[:1], dicomweb_slide.server, same_series)
    source = servers.source("pacs", study, series)
    with open_slide(source) as slide:
        assert len(slide.metadata.level_dimensions) == 1
        before = slide.metadata.level_dimensions[0]
    _restore(by_width[1:], dicomweb_slide.server, same_series)
    with open_slide(source) as slide, open_slide(by_width[0]) as files:
        assert len(slide.metadata.level_dimensions) == len(by_width) > 1
        assert slide.metadata.level_dimensions == files.metadata.level_dimensions
        assert slide.metadata.level_dimensions[-1] == before
    # unchanged: the pooled series is used again
    with open_slide(source) as first, open_slide(source) as again:
        assert first.series is again.series


def test_series_without_a_pyramid_is_refused_in_words(
    converted: dict[str, tuple[Path, str, str]],
    servers: DicomWebServers,
    dicomweb_slide: DicomWebSlide,
    tmp_path: Path,
) -> None:
    """A series holding only a LABEL and an OVERVIEW image: SLIDE_UNSUPPORTED saying so
    (it was "could not be opened as a whole-slide image: AttributeError"), in the same
    words over DICOMweb and from the same instances as local files."""
    smallest = _by_width(converted["jpegls"][0])[0]
    kinds = iter(("LABEL", "OVERVIEW", "LABEL", "OVERVIEW"))

    def flavour(ds: pydicom.Dataset) -> None:
        image_type = list(ds.ImageType)
        image_type[2] = next(kinds)
        ds.ImageType = image_type
        ds.save_as(tmp_path / f"{image_type[2].lower()}.dcm")

    study, series = _restore([smallest, smallest], dicomweb_slide.server, flavour)
    with pytest.raises(UnsupportedSlideError) as info:
        servers.source("pacs", study, series).open()
    assert "holds no VOLUME (pyramid) image" in info.value.message
    assert "Error" not in info.value.message
    with pytest.raises(UnsupportedSlideError) as local:
        open_slide(tmp_path / "label.dcm")
    assert local.value.message == info.value.message


class _PacsWithoutAsStored(BaseHTTPRequestHandler):
    """A PACS front that does not serve frames "as stored": 406 for an Accept with
    ``transfer-syntax=*``; every other GET is passed to the real Orthanc behind it
    (``server.target``), its status, Content-Type and body returned."""

    def do_GET(self) -> None:
        import requests

        accept = self.headers.get("Accept", "")
        self.server.accepts.append(accept)  # type: ignore[attr-defined]
        if "transfer-syntax=*" in accept:
            self.send_response(406)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        found = requests.get(
            self.server.target + self.path,  # type: ignore[attr-defined]
            headers={"Accept": accept} if accept else {},
            timeout=60,
        )
        self.send_response(found.status_code)
        if "Content-Type" in found.headers:
            self.send_header("Content-Type", found.headers["Content-Type"])
        self.send_header("Content-Length", str(len(found.content)))
        self.end_headers()
        self.wfile.write(found.content)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def pacs_without_as_stored(dicomweb_slide: DicomWebSlide):
    """``(servers, accepts)``: servers whose ``pacs`` is :class:`_PacsWithoutAsStored`
    in front of the session's Orthanc; ``accepts`` lists the Accept headers it saw."""
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _PacsWithoutAsStored)
    proxy.target = dicomweb_slide.server.base_url  # type: ignore[attr-defined]
    proxy.accepts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}/dicom-web"
    servers = DicomWebServers(parse_endpoints(f"pacs={url}"))
    yield servers, proxy.accepts  # type: ignore[attr-defined]
    servers.close()
    proxy.shutdown()
    proxy.server_close()


@pytest.mark.parametrize("kind", list(SYNTAXES))
def test_a_pacs_that_does_not_say_the_stored_syntax_is_probed_past_its_http_500(
    kind: str,
    converted: dict[str, tuple[Path, str, str]],
    dicomweb_slide: DicomWebSlide,
    pacs_without_as_stored,
) -> None:
    """Where the PACS does not serve frames as stored, syntaxes are probed in an order
    the metadata points: JPEG 2000 first for YBR_ICT; lossless syntaxes first for an
    instance saying Lossy Image Compression "00" (the JPEG-LS series stored again so),
    where Orthanc's HTTP 500 for JPEG 2000 lossless, which it cannot encode, means "not
    served" (it was a retryable PACS_UNAVAILABLE) and JPEG-LS comes next. Either way
    the stored syntax is read and the pixels equal the local files'."""
    servers, accepts = pacs_without_as_stored
    folder, study, series = converted[kind]
    local = _by_width(folder)[-1]  # level 0
    if kind == "jpegls":

        def never_lossy(ds: pydicom.Dataset) -> None:
            ds.LossyImageCompression = "00"

        study, series = _restore([local], dicomweb_slide.server, never_lossy)
    with open_slide(servers.source("pacs", study, series)) as web, open_slide(local) as files:
        chosen = web.series.wsi.levels[0].default_instance.image_data.transfer_syntax
        np.testing.assert_array_equal(
            web.read_level_rgb(0, 300, 400, 700, 600), files.read_level_rgb(0, 300, 400, 700, 600)
        )
    assert str(chosen) == SYNTAXES[kind]
    assert any("transfer-syntax=*" in a for a in accepts)  # asked, refused
    if kind == "jpegls":  # JPEG 2000 lossless was asked for first: HTTP 500 from Orthanc
        assert any("1.2.840.10008.1.2.4.90" in a for a in accepts)
