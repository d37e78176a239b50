"""A DICOM WSI series with three focal planes and two optical paths, from the PACS and
from local files, through a real gRPC server: the first brightfield optical path and
the focal plane nearest the middle of the z-stack (z 0 of -2, 0, 2 um; not the lowest,
which is the most defocused plane of a stack taken around the focus) are analysed, the
client gets QC warnings saying so, and the results equal those of the single-plane
series holding the same pixels.

The series is made from the converted real slide with pydicom (least code: wsidicom
and highdicom would re-encode the frames): its level-0 instance as is (z 0 um, optical
path "0"), again at z -2 um and at z 2 um, and again as optical path "1", the copies
with their frames in reverse order, so reading any of them would change the
probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_support import DicomWebSlide, stow
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid
from server_fixtures import inprocess_server
from test_dicomweb_service import _analyze, insecure_stub

from histohelper.v1 import slide_analysis_pb2 as pb

FOLDER = "planes"
WARNINGS = (
    "the series has 2 optical paths: the first brightfield one is analysed",
    "the series has 3 focal planes (z -2 to 2 um): the plane at z 0 um, nearest the "
    "middle of the stack, is analysed",
)


@pytest.fixture(scope="module")
def variant(
    dicomweb_slide: DicomWebSlide, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, str]:
    """``(slide_root, study_uid, series_uid)``: the four instances written to
    ``slide_root/planes/`` and stored in the session's Orthanc."""
    root = tmp_path_factory.mktemp("planes-root")
    (root / FOLDER).mkdir()
    source = next(iter(sorted(dicomweb_slide.dicom_dir.glob("*.dcm"))))
    study, series = generate_uid(), generate_uid()
    instances = [pydicom.dcmread(source) for _copy in range(4)]
    _, other_plane, lower_plane, other_path = instances
    for ds in (other_plane, lower_plane, other_path):
        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
        ds.PixelData = encapsulate(frames[::-1])
    other_plane.TotalPixelMatrixOriginSequence[0].ZOffsetInSlideCoordinateSystem = 2.0  # um
    lower_plane.TotalPixelMatrixOriginSequence[0].ZOffsetInSlideCoordinateSystem = -2.0
    other_path.OpticalPathSequence[0].OpticalPathIdentifier = "1"
    files = []
    for name, ds in zip(("z0-path0", "z2-path0", "zm2-path0", "z0-path1"), instances, strict=True):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(root / FOLDER / f"{name}.dcm")
        files.append(root / FOLDER / f"{name}.dcm")
    stow(dicomweb_slide.server, files)
    return root, study, series


@pytest.fixture(scope="module")
def server(model_artifact: Path, served_runtime, dicomweb_slide: DicomWebSlide, variant):
    """A real in-process server: slide root holding the local variant, ``pacs`` the
    session's Orthanc."""
    pacs = f"pacs={dicomweb_slide.server.dicomweb_url}"
    running = inprocess_server(model_artifact, served_runtime, variant[0], dicomweb=pacs)
    yield running
    running.stop(grace=0, drain=0)


@pytest.fixture(scope="module")
def single_plane(server, dicomweb_slide: DicomWebSlide):
    """``(started, probabilities, boxes)`` of the single-plane series (same pixels)."""
    series = pb.DicomWebSeries(
        server="pacs",
        study_instance_uid=dicomweb_slide.study_instance_uid,
        series_instance_uid=dicomweb_slide.series_instance_uid,
    )
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    return _analyze(stub, pb.AnalyzeSlideRequest(dicomweb=series))


def test_the_variant_really_holds_other_pixels(variant) -> None:
    """Guard of the test below: the second plane and the second path differ from the
    first, so reading either would change the results."""
    from wsidicom import WsiDicom
    from wsidicom.geometry import Point, Region, Size

    with WsiDicom.open(sorted((variant[0] / FOLDER).glob("*.dcm"))) as wsi:
        level = wsi.levels[0]
        assert level.focal_planes == [-2.0, 0.0, 2.0]
        assert sorted(level.optical_paths) == ["0", "1"]
        region = Region(Point(0, 0), Size(512, 512))

        def read(z: float, path: str) -> np.ndarray:
            return np.asarray(level.get_region(region, z, path))

        assert (read(2.0, "0") != read(0.0, "0")).mean() > 0.5
        assert (read(-2.0, "0") != read(0.0, "0")).mean() > 0.5
        assert (read(0.0, "1") != read(0.0, "0")).mean() > 0.5


@pytest.mark.parametrize("where", ["pacs", "local"])
def test_middle_plane_and_first_path_are_analysed_with_a_warning(
    server, variant, single_plane, where: str
) -> None:
    _, study, series = variant
    if where == "pacs":
        request = pb.AnalyzeSlideRequest(
            dicomweb=pb.DicomWebSeries(
                server="pacs", study_instance_uid=study, series_instance_uid=series
            )
        )
    else:
        request = pb.AnalyzeSlideRequest(slide_path=f"{FOLDER}/z0-path0.dcm")
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    started, probs, boxes = _analyze(stub, request)
    ref_started, ref_probs, ref_boxes = single_plane
    assert started is not None and started.dicom.series_instance_uid == series
    for warning in WARNINGS:
        assert warning in started.qc.warnings
    assert not set(WARNINGS) & set(ref_started.qc.warnings)
    assert len(probs) == started.grid.patch_count > 0
    assert boxes == ref_boxes
    np.testing.assert_array_equal(
        np.array([probs[i] for i in sorted(probs)]),
        np.array([ref_probs[i] for i in sorted(ref_probs)]),
    )
