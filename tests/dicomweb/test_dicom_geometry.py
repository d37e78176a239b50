"""DICOM WSI series whose geometry wsidicom alone would get wrong, from local files and
from the PACS, through a real gRPC server (tester A's findings 3, 4 and 6):

- two slides in one series (another frame of reference; locally also another study):
  refused from the PACS (a patient mix-up must be impossible); a local path keeps to
  the named file's study and frame of reference, with a warning;
- a level split over two TILED_SPARSE instances of one plane and path: read whole both
  ways (wsidicom alone reads one of them: 14 of 49 patches), exactly as the same frames
  in one instance;
- no Pixel Spacing: the same SLIDE_UNSUPPORTED words both ways, never OpenSlide's
  mis-decoding of the file.

The variants are pydicom edits of the converted real slide (frames copied, never
re-encoded).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from orthanc_support import DicomWebSlide, stow
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from server_fixtures import inprocess_server
from test_dicomweb_service import _analyze, insecure_stub, status_of

from histohelper.v1 import slide_analysis_pb2 as pb

TWO_SLIDES = "holds 2 slides"
NO_SPACING = "the DICOM series has no pixel spacing"
LEFT_OUT = "the folder holds 2 other instance(s) of this series from another study"


def _frames(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def _renew(ds: Dataset, study: str, series: str) -> Dataset:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _top_rows(ds: Dataset, tile_rows: int) -> Dataset:
    """``ds`` (TILED_FULL) cut to its first ``tile_rows`` rows of frames: a smaller
    image of the same pixels."""
    cols = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    ds.PixelData = encapsulate(_frames(ds)[: tile_rows * cols])
    ds.NumberOfFrames = tile_rows * cols
    ds.TotalPixelMatrixRows = tile_rows * int(ds.Rows)
    return ds


def _sparse(ds: Dataset, keep: range) -> Dataset:
    """``ds`` as a TILED_SPARSE instance holding only the frames ``keep``."""
    frames = _frames(ds)
    cols = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    per_frame = Sequence()
    for i in keep:
        position = Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = (i % cols) * int(ds.Columns) + 1
        position.RowPositionInTotalImagePixelMatrix = (i // cols) * int(ds.Rows) + 1
        position.XOffsetInSlideCoordinateSystem = 0
        position.YOffsetInSlideCoordinateSystem = 0
        position.ZOffsetInSlideCoordinateSystem = 0
        path = Dataset()
        path.OpticalPathIdentifier = ds.OpticalPathSequence[0].OpticalPathIdentifier
        item = Dataset()
        item.PlanePositionSlideSequence = Sequence([position])
        item.OpticalPathIdentificationSequence = Sequence([path])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.NumberOfFrames = len(keep)
    ds.PixelData = encapsulate([frames[i] for i in keep])
    return ds


def _save(datasets: list[Dataset], folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.dcm" for name in names]
    for ds, path in zip(datasets, paths, strict=True):
        ds.save_as(path)
    return paths


@pytest.fixture(scope="module")
def variants(dicomweb_slide: DicomWebSlide, tmp_path_factory: pytest.TempPathFactory):
    """``(slide_root, {case: (study, series)})``: each variant written under
    ``slide_root/CASE/`` and stored in the session's Orthanc."""
    root = tmp_path_factory.mktemp("geometry-root")
    source = next(iter(sorted(dicomweb_slide.dicom_dir.glob("*.dcm"))))

    def copy() -> Dataset:
        return pydicom.dcmread(source)

    stored: dict[str, tuple[str, str]] = {}
    # Two slides, one series: the real slide and its top 6 frame rows in another frame
    # of reference (stored together); locally also a third instance of another study
    # sharing the small slide's frame of reference (a larger image wsidicom would take
    # as the base of the named file's slide).
    study, series, other_for = generate_uid(), generate_uid(), generate_uid()
    big = _renew(copy(), study, series)
    small = _renew(_top_rows(copy(), 6), study, series)
    small.FrameOfReferenceUID = other_for
    other_study = _renew(copy(), generate_uid(), series)
    other_study.FrameOfReferenceUID = other_for
    _save([big, small, other_study], root / "two", ["big", "small", "other-study"])
    stow(dicomweb_slide.server, [big, small])
    stored["two"] = (study, series)
    alone = _renew(_top_rows(copy(), 6), generate_uid(), generate_uid())
    _save([alone], root / "alone", ["small"])
    _save([_renew(copy(), generate_uid(), generate_uid())], root / "whole", ["whole"])
    # Level 0 split over two TILED_SPARSE instances (frames [0, k) and [k, n)).
    study, series = generate_uid(), generate_uid()
    n = int(copy().NumberOfFrames)
    halves = [
        _renew(_sparse(copy(), part), study, series) for part in (range(n // 2), range(n // 2, n))
    ]
    _save(halves, root / "split", ["first", "second"])
    stow(dicomweb_slide.server, halves)
    stored["split"] = (study, series)
    # No Pixel Spacing.
    study, series = generate_uid(), generate_uid()
    bare = _renew(copy(), study, series)
    del bare.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    for name in ("ImagedVolumeWidth", "ImagedVolumeHeight"):
        if name in bare:
            delattr(bare, name)
    _save([bare], root / "nospacing", ["bare"])
    stow(dicomweb_slide.server, [bare])
    stored["nospacing"] = (study, series)
    return root, stored


@pytest.fixture(scope="module")
def stub(model_artifact: Path, served_runtime, dicomweb_slide: DicomWebSlide, variants):
    """Stub of a real in-process server: slide root holding the local variants,
    ``pacs`` the session's Orthanc."""
    pacs = f"pacs={dicomweb_slide.server.dicomweb_url}"
    running = inprocess_server(model_artifact, served_runtime, variants[0], dicomweb=pacs)
    yield insecure_stub(f"127.0.0.1:{running.port}")
    running.stop(grace=0, drain=0)


def _request(variants, case: str, where: str, name: str = "") -> pb.AnalyzeSlideRequest:
    if where == "local":
        return pb.AnalyzeSlideRequest(slide_path=f"{case}/{name}.dcm")
    study, series = variants[1][case]
    return pb.AnalyzeSlideRequest(
        dicomweb=pb.DicomWebSeries(
            server="pacs", study_instance_uid=study, series_instance_uid=series
        )
    )


def _refused(stub, request: pb.AnalyzeSlideRequest) -> str:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnalyzeSlide(request, timeout=120))
    assert status_of(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_UNSUPPORTED")
    details = info.value.details() or ""
    assert "1.2." not in details and "Error" not in details  # no UID, no class name
    return details


def test_a_series_of_two_slides_is_refused_from_the_pacs(stub, variants) -> None:
    details = _refused(stub, _request(variants, "two", "pacs"))
    assert TWO_SLIDES in details and "2 frames of reference" in details


def test_a_local_file_keeps_to_its_own_study_and_frame_of_reference(stub, variants) -> None:
    """The named small image is analysed, exactly as the same file alone in a folder,
    never the larger image of another frame of reference or study in its series."""
    started, probs, boxes = _analyze(stub, _request(variants, "two", "local", "small"))
    ref_started, ref_probs, ref_boxes = _analyze(
        stub, _request(variants, "alone", "local", "small")
    )
    assert started is not None and ref_started is not None
    assert (started.slide.width_l0, started.slide.height_l0) == (2220, 1440)
    assert LEFT_OUT in " ".join(started.qc.warnings)
    assert not any("other instance" in w for w in ref_started.qc.warnings)
    assert len(probs) == started.grid.patch_count > 0
    assert boxes == ref_boxes
    np.testing.assert_array_equal(
        np.array([probs[i] for i in sorted(probs)]),
        np.array([ref_probs[i] for i in sorted(ref_probs)]),
    )


@pytest.fixture(scope="module")
def whole(stub, variants):
    """``(started, probabilities, boxes)`` of the unsplit level in one instance."""
    return _analyze(stub, _request(variants, "whole", "local", "whole"))


@pytest.mark.parametrize("where", ["pacs", "local"])
def test_a_level_split_over_two_instances_is_read_whole(stub, variants, whole, where: str) -> None:
    started, probs, boxes = _analyze(stub, _request(variants, "split", where, "second"))
    ref_started, ref_probs, ref_boxes = whole
    assert started is not None and ref_started is not None
    assert started.grid.patch_count == ref_started.grid.patch_count > 0
    assert started.qc.tissue_fraction == ref_started.qc.tissue_fraction
    assert boxes == ref_boxes
    np.testing.assert_array_equal(
        np.array([probs[i] for i in sorted(probs)]),
        np.array([ref_probs[i] for i in sorted(ref_probs)]),
    )


def test_no_pixel_spacing_gets_the_same_answer_locally_and_from_the_pacs(stub, variants) -> None:
    local = _refused(stub, _request(variants, "nospacing", "local", "bare"))
    pacs = _refused(stub, _request(variants, "nospacing", "pacs"))
    assert local == pacs and local.startswith(NO_SPACING)


@pytest.mark.parametrize(
    ("planes", "chosen"),
    [
        ([-4.0, -2.0, 0.0, 2.0, 4.0], 0.0),  # wsidicom 0.31's default_z: 4.0
        ([0.0, 2.0], 0.0),
        ([-2.0, 0.0], 0.0),
        ([1.0, 2.0, 3.0], 2.0),
        ([3.0, 0.0, 2.0, 1.0], 1.0),  # middle 1.5: tie, nearest z 0
        ([5.0], 5.0),
    ],
)
def test_the_plane_read_is_the_middle_of_the_stack(planes: list[float], chosen: float) -> None:
    from histohelper.server.tiling.dicom import nominal_focal_plane

    assert nominal_focal_plane(planes) == chosen
    assert nominal_focal_plane(sorted(planes, reverse=True)) == chosen
