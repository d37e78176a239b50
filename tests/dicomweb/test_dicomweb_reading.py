"""Reading a DICOM WSI series over DICOMweb from a real Orthanc: the same metadata,
grid and pixels as the SVS file it was converted from (wsidicomizer copied the JPEG
tiles), and each bad case mapped to its error."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from orthanc_support import DicomWebSlide, Orthanc, free_port, store_with_broken_frames

from histohelper.errors import (
    CorruptSlideError,
    DicomWebNotConfiguredError,
    PacsPermissionDeniedError,
    PacsUnavailableError,
    SlideNotFoundError,
)
from histohelper.server.dicomweb import DicomWebServers, parse_endpoints
from histohelper.server.tiling import PatchReader, TilingOptions, open_slide, plan_tiling


@pytest.fixture(scope="module")
def servers(dicomweb_slide: DicomWebSlide) -> DicomWebServers:
    servers = DicomWebServers(parse_endpoints(f"pacs={dicomweb_slide.server.dicomweb_url}"))
    yield servers
    servers.close()


def test_metadata_grid_and_pixels_equal_the_svs(
    servers: DicomWebServers, dicomweb_slide: DicomWebSlide, real_slide: Path
) -> None:
    source = servers.source(
        "pacs", dicomweb_slide.study_instance_uid, dicomweb_slide.series_instance_uid
    )
    with open_slide(real_slide) as svs, open_slide(source) as dcm:
        assert dcm.metadata.level_dimensions == svs.metadata.level_dimensions
        assert dcm.metadata.mpp_x == pytest.approx(svs.metadata.mpp_x, rel=1e-6)
        assert dcm.metadata.dicom is not None
        assert dcm.metadata.dicom.series_instance_uid == dicomweb_slide.series_instance_uid
        assert dcm.metadata.dicom.dicomweb_server == "pacs"
        plan_svs = plan_tiling(svs, TilingOptions())
        plan_dcm = plan_tiling(dcm, TilingOptions())
        assert plan_dcm.mpp_source == "metadata"
    assert len(plan_svs.grid) > 0
    np.testing.assert_array_equal(plan_dcm.grid.x_l0, plan_svs.grid.x_l0)
    np.testing.assert_array_equal(plan_dcm.grid.y_l0, plan_svs.grid.y_l0)
    np.testing.assert_array_equal(plan_dcm.mask.mask, plan_svs.mask.mask)
    batches = {}
    for name, slide in (("svs", real_slide), ("dcm", source)):
        reader = PatchReader(slide, plan_svs.grid, batch_size=16, num_workers=2)
        images = np.zeros((len(plan_svs.grid), 224, 224, 3), np.uint8)
        for batch in reader.iter_batches():
            assert batch.failed.size == 0
            images[batch.indices] = batch.images
        batches[name] = images
    np.testing.assert_array_equal(batches["dcm"], batches["svs"])


def test_unknown_uids_are_not_found(
    servers: DicomWebServers, dicomweb_slide: DicomWebSlide
) -> None:
    with pytest.raises(SlideNotFoundError):
        servers.source("pacs", dicomweb_slide.study_instance_uid, "1.2.3.4.5").open()
    with pytest.raises(SlideNotFoundError):
        servers.source("pacs", "1.2.3.4", "1.2.3.4.5").open()


def test_unconfigured_name_is_refused(servers: DicomWebServers) -> None:
    with pytest.raises(DicomWebNotConfiguredError):
        servers.source("elsewhere", "1.2.3", "1.2.3.4")


def test_closed_port_is_unavailable_with_a_retry_hint() -> None:
    servers = DicomWebServers(parse_endpoints(f"down=http://127.0.0.1:{free_port()}/dicom-web"))
    with pytest.raises(PacsUnavailableError) as info:
        servers.source("down", "1.2.3", "1.2.3.4").open()
    assert info.value.metadata["retry_after_s"]
    assert "'down'" in info.value.message


def test_refused_credentials_name_the_pacs_not_the_secret(
    orthanc_auth: Orthanc, tmp_path: Path
) -> None:
    (tmp_path / "locked.basic").write_text("histo:wrong-password")
    servers = DicomWebServers(
        parse_endpoints(f"locked={orthanc_auth.dicomweb_url}", secrets_dir=tmp_path)
    )
    with pytest.raises(PacsPermissionDeniedError) as info:
        servers.source("locked", "1.2.3", "1.2.3.4").open()
    assert "'locked'" in info.value.message
    assert "wrong-password" not in info.value.message and "histo" not in info.value.message


def test_local_dicom_folder_reads_through_the_same_code(
    dicomweb_slide: DicomWebSlide, real_slide: Path
) -> None:
    """A local DICOM WSI folder opens with wsidicom (DicomSlide), not OpenSlide: same
    pixels as the SVS, and its DICOM identity (no DICOMweb server name)."""
    instance = next(iter(sorted(dicomweb_slide.dicom_dir.glob("*.dcm"))))
    with open_slide(real_slide) as svs, open_slide(instance) as dcm:
        assert type(dcm).__name__ == "DicomSlide"
        assert dcm.metadata.dicom is not None and dcm.metadata.dicom.dicomweb_server == ""
        assert dcm.metadata.dicom.study_instance_uid == dicomweb_slide.study_instance_uid
        np.testing.assert_array_equal(
            dcm.read_level_rgb(0, 100, 200, 512, 512), svs.read_level_rgb(0, 100, 200, 512, 512)
        )


def test_no_uid_or_url_reaches_the_logs(
    servers: DicomWebServers, dicomweb_slide: DicomWebSlide, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading a series and failing on unknown UIDs log neither UIDs nor the PACS URL,
    even at DEBUG (dicomweb-client, urllib3 and wsidicom would)."""
    caplog.set_level(logging.DEBUG)
    source = servers.source(
        "pacs", dicomweb_slide.study_instance_uid, dicomweb_slide.series_instance_uid
    )
    with open_slide(source) as slide:
        slide.read_level_rgb(0, 0, 0, 300, 300)
    with pytest.raises(SlideNotFoundError):
        servers.source("pacs", dicomweb_slide.study_instance_uid, "1.2.3.4.5").open()
    for secret in (
        dicomweb_slide.study_instance_uid,
        dicomweb_slide.series_instance_uid,
        dicomweb_slide.server.dicomweb_url,
    ):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("tolerance", "fails"), [(1.0, False), (0.0, True)], ids=["tolerated", "past-tolerance"]
)
def test_broken_frames_fail_patches_then_the_slide_past_the_tolerance(
    servers: DicomWebServers,
    dicomweb_slide: DicomWebSlide,
    real_slide: Path,
    tolerance: float,
    fails: bool,
) -> None:
    """Frames that cannot be decoded are failed patch reads, counted against the same
    ``max_failed_fraction`` as files: SLIDE_CORRUPT only past it."""
    study, series = store_with_broken_frames(dicomweb_slide, lambda i: i % 7 == 3)
    with open_slide(real_slide) as svs:
        grid = plan_tiling(svs, TilingOptions()).grid
    reader = PatchReader(
        servers.source("pacs", study, series), grid, batch_size=16, max_failed_fraction=tolerance
    )
    if fails:
        with pytest.raises(CorruptSlideError):
            list(reader.iter_batches())
        return
    batches = list(reader.iter_batches())
    failed = sum(b.failed.size for b in batches)
    read = sum(b.indices.size for b in batches)
    assert 0 < failed < len(grid) and failed + read == len(grid)


def test_opening_a_series_leaves_bulk_data_unfetched_without_a_warning(
    dicomweb_slide: DicomWebSlide, caplog: pytest.LogCaptureFixture
) -> None:
    """The PACS's metadata gives the optical path's ICC profile as a BulkDataURI;
    wsidicom's own client made pydicom warn "No bulk data URI handler ..." (a Python
    warning and a pydicom log record) on every instance opened. A fresh pool, so the
    series' metadata is really fetched."""
    import warnings

    meta = dicomweb_slide.server.client().retrieve_series_metadata(
        dicomweb_slide.study_instance_uid, dicomweb_slide.series_instance_uid
    )
    paths = [item for m in meta for item in m.get("00480105", {}).get("Value", [])]
    assert any("BulkDataURI" in path.get("00282000", {}) for path in paths)  # it is sent
    caplog.set_level(logging.DEBUG)
    servers = DicomWebServers(parse_endpoints(f"pacs={dicomweb_slide.server.dicomweb_url}"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = servers.source(
            "pacs", dicomweb_slide.study_instance_uid, dicomweb_slide.series_instance_uid
        )
        with open_slide(source) as slide:
            assert slide.read_level_rgb(0, 0, 0, 64, 64).shape == (64, 64, 3)
        servers.close()
    assert not [w for w in caught if "bulk data" in str(w.message).lower()]
    assert "bulk data" not in caplog.text.lower()
