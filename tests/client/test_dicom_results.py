"""DICOM result objects (client/dicom_results.py) built from a real DICOM WSI source.

The source is the level-0 instance of the real series ``../shared/slides/dicom-boxes/``
read with pydicom and turned into DICOM JSON without bulk data, exactly what the
server sends as ``AnalysisStarted.dicom.source_image_json``; its total pixel matrix is
set to the synthetic stream's slide size and its origin moved off zero (the
orientation stays the file's own, rows along -y and columns along -x). The result
comes from a synthetic stream (tests/client/client_fakes.py) assembled by the real
ResultCollector; the written files are parsed back with highdicom.

Expected slide coordinates are computed from the DICOM attributes, not with highdicom
(tests/dicom_results_support.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from client_fakes import StreamSpec, build_stream  # noqa: E402
from dicom_results_support import box_corners, expected_slide_mm, source_json  # noqa: E402

from histohelper.client import ResultCollector, event_from_proto  # noqa: E402
from histohelper.client.dicom_results import (  # noqa: E402
    NO_PATCH,
    file_names,
    prediction_text,
    result_objects,
    write_dicom,
)
from histohelper.v1 import slide_analysis_pb2 as pb  # noqa: E402

SPEC = {"n_rows": 6, "n_cols": 7, "slide_l0": (720, 600), "seed": 3}


def dicom_messages(server: str = "pacs", **spec: object):
    """A synthetic AnalyzeSlide stream whose Started carries a real DicomSource:
    ``(messages, expected, source dataset)``."""
    s = StreamSpec(**{**SPEC, **spec})  # type: ignore[arg-type]
    msgs, expected = build_stream(s)
    text, ds = source_json(*s.slide_l0)
    msgs[0].started.dicom.CopyFrom(
        pb.DicomSource(
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            frame_of_reference_uid=ds.FrameOfReferenceUID,
            source_image_json=text,
            dicomweb_server=server,
        )
    )
    return msgs, expected, ds


def dicom_result(server: str = "pacs", **spec: object):
    """The SlideResult of :func:`dicom_messages`, assembled by the real ResultCollector."""
    msgs, expected, ds = dicom_messages(server, **spec)
    collector = ResultCollector()
    for m in msgs:
        collector.add(event_from_proto(m))
    return collector.result(), expected, ds


def read_back(paths: list[Path]) -> tuple[object, list[object]]:
    """The annotations and the maps of written files (the report is read by its test)."""
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(paths[0]))
    map_paths = [p for p in paths if p.name.startswith("probability_map_")]
    maps = [hd.pm.ParametricMap.from_dataset(pydicom.dcmread(p)) for p in map_paths]
    return ann, maps


def test_annotations_one_polygon_per_patch_in_slide_coordinates(tmp_path: Path) -> None:
    result, expected, ds = dicom_result()
    paths = write_dicom(result, tmp_path)
    assert [p.name for p in paths] == file_names(result)
    ann, _ = read_back(paths)

    assert ann.AnnotationCoordinateType == "3D"
    assert ann.StudyInstanceUID == ds.StudyInstanceUID
    assert ann.FrameOfReferenceUID == ds.FrameOfReferenceUID
    assert ann.SeriesInstanceUID != ds.SeriesInstanceUID
    referenced = ann.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ds.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID

    p = result.patches
    predicted = np.argmax(p.probabilities, axis=1)
    groups = ann.get_annotation_groups()
    assert sum(g.number_of_annotations for g in groups) == len(p) == len(expected.patch_index)
    assert sorted(g.label for g in groups) == sorted(
        result.class_names[k] for k in np.unique(predicted)
    )
    corners = box_corners(p.x_l0, p.y_l0, p.width_l0, p.height_l0)
    worst_um, worst_value = 0.0, 0.0
    for g in groups:
        rows = np.flatnonzero(predicted == result.class_names.index(g.label))
        polygons = np.asarray(g.get_graphic_data("3D"))  # [n, 4, 3] mm
        want = expected_slide_mm(ds, corners[rows].reshape(-1, 2)).reshape(-1, 4, 3)
        worst_um = max(worst_um, float(np.abs(polygons - want).max()) * 1000.0)
        names, values, _ = g.get_measurements()
        meanings = [n.meaning for n in names]
        want_values = [p.probabilities[rows, i] for i in range(len(result.class_names))]
        assert meanings[: len(result.class_names)] == [
            f"Probability of {c}" for c in result.class_names
        ]
        assert meanings[-1] == "MIL attention"
        want_values.append(p.attention[rows])
        got = np.asarray(values, np.float32)
        worst_value = max(worst_value, float(np.abs(got - np.stack(want_values, 1)).max()))
        algorithm = g.algorithm_identification
        assert algorithm[0].AlgorithmName == result.model.name
        assert algorithm[0].AlgorithmVersion == result.model.version
    print(f"max polygon deviation {worst_um:.2e} um, max measurement deviation {worst_value:g}")
    assert worst_um < 1.0
    assert worst_value == 0.0  # float32 values stored as float32


def test_annotations_2d_are_the_level0_boxes(tmp_path: Path) -> None:
    result, _, _ = dicom_result()
    ann = result.to_dicom(coordinates="2D")[0]
    back = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(
        pydicom.dcmread(write_dicom(result, tmp_path, objects=result.to_dicom(coordinates="2D"))[0])
    )
    assert ann.AnnotationCoordinateType == back.AnnotationCoordinateType == "2D"
    p = result.patches
    predicted = np.argmax(p.probabilities, axis=1)
    for g in back.get_annotation_groups():
        rows = np.flatnonzero(predicted == result.class_names.index(g.label))
        polygons = np.asarray(g.get_graphic_data("2D"))  # [n, 4, 2] level-0 px
        np.testing.assert_allclose(polygons[:, 0, 0], p.x_l0[rows], atol=1e-3)
        np.testing.assert_allclose(polygons[:, 0, 1], p.y_l0[rows], atol=1e-3)
        np.testing.assert_allclose(polygons[:, 2, 0], (p.x_l0 + p.width_l0)[rows], atol=1e-3)
        np.testing.assert_allclose(polygons[:, 2, 1], (p.y_l0 + p.height_l0)[rows], atol=1e-3)


def test_probability_maps_hold_the_heatmap_registered_to_the_slide(tmp_path: Path) -> None:
    result, _, ds = dicom_result()
    _, maps = read_back(write_dicom(result, tmp_path))
    assert len(maps) == len(result.class_names)
    g = result.grid
    rows, cols = np.mgrid[0 : g.n_rows, 0 : g.n_cols]
    centres_l0 = np.stack(
        [
            g.origin_x_l0 + cols.ravel() * g.stride_x_l0 + g.patch_width_l0 / 2,
            g.origin_y_l0 + rows.ravel() * g.stride_y_l0 + g.patch_height_l0 / 2,
        ],
        1,
    )
    want_mm = expected_slide_mm(ds, centres_l0)
    for k, pm in enumerate(maps):
        assert pm.StudyInstanceUID == ds.StudyInstanceUID
        assert pm.FrameOfReferenceUID == ds.FrameOfReferenceUID
        assert pm.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert pm.SeriesInstanceUID == maps[0].SeriesInstanceUID
        shared = pm.SharedFunctionalGroupsSequence[0]
        frame = pm.PerFrameFunctionalGroupsSequence[0]
        mapping = shared if "RealWorldValueMappingSequence" in shared else frame
        assert mapping.RealWorldValueMappingSequence[0].LUTLabel == result.class_names[k]
        assert float(pm.FloatPixelPaddingValue) == NO_PATCH
        assert (pm.TotalPixelMatrixRows, pm.TotalPixelMatrixColumns) == (g.n_rows, g.n_cols)
        pixels = pm.get_total_pixel_matrix(dtype=np.float32, apply_real_world_transform=False)
        want = np.nan_to_num(result.heatmaps[k], nan=NO_PATCH)
        np.testing.assert_array_equal(pixels, want)
        # map pixel (r, c)'s centre is patch (r, c)'s centre on the slide
        to_slide = hd.spatial.ImageToReferenceTransformer.for_image(pm, for_total_pixel_matrix=True)
        got_mm = to_slide(np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], 1))
        assert float(np.abs(got_mm - want_mm).max()) * 1000.0 < 1.0


def test_slide_report_holds_the_prediction_and_mc_dropout_figures(tmp_path: Path) -> None:
    import dataclasses

    from histohelper.client import SlideUncertainty

    result, _, ds = dicom_result()
    p = result.prediction
    assert p is not None
    unc = SlideUncertainty(mean=(0.4, 0.6), std=(0.05, 0.07), entropy_nats=0.673, passes=8)
    result = dataclasses.replace(result, prediction=dataclasses.replace(p, uncertainty=unc))
    path = write_dicom(result, tmp_path)[-1]
    assert path.name == "slide_report.dcm"
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == ds.SeriesInstanceUID
    (group,) = sr.content.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    want: dict[str, float] = {"Predictive entropy": 0.673, "MC dropout passes": 8}
    for i, c in enumerate(p.class_names):
        want[f"Probability of {c}"] = p.probabilities[i]
        want[f"MC dropout mean probability of {c}"] = unc.mean[i]
        want[f"MC dropout std of {c}"] = unc.std[i]
    assert values.keys() == want.keys()
    worst = max(abs(values[k] - want[k]) for k in want)
    print(f"max report value deviation {worst:.2g}")
    assert worst < 1e-9  # decimal strings of 16 characters
    (finding,) = group.get_qualitative_evaluations()
    assert finding.value.meaning == p.predicted_class
    from pydicom.sr.codedict import codes

    def texts(name: object) -> set[str]:
        found = hd.sr.utils.find_content_items(sr, name=name, recursive=True)
        return {item.TextValue for item in found}

    assert texts(codes.DCM.AlgorithmName) == {result.model.name}
    assert texts(codes.DCM.AlgorithmVersion) == {result.model.version}


def test_descriptions_carry_prediction_uncertainty_and_model() -> None:
    result, _, _ = dicom_result()
    ann, *rest = result.to_dicom()
    maps = rest[: len(result.class_names)]
    text = prediction_text(result)
    assert result.prediction is not None
    assert f"Slide prediction: {result.prediction.predicted_class}" in text
    assert f"{result.model.name} {result.model.version}" in text
    assert "[UNTRAINED]" in text  # the fake model is untrained
    assert all(text in g.AnnotationGroupDescription for g in ann.AnnotationGroupSequence)
    assert all(text in m.ImageComments for m in maps)
    assert result.prediction.predicted_class in ann.ContentDescription
    assert len(ann.ContentDescription) <= 64 and len(ann.SeriesDescription) <= 64


def test_a_result_without_dicom_source_is_refused() -> None:
    from client_fakes import collect_result

    result = collect_result()
    assert result.dicom is None
    with pytest.raises(ValueError, match="not read from DICOM"):
        result.to_dicom()


def test_a_result_without_patches_is_refused() -> None:
    result, _, _ = dicom_result(no_tissue=True)
    assert result.dicom is not None and result.patch_count == 0
    with pytest.raises(ValueError, match="no patches"):
        result_objects(result)


def test_a_source_of_another_size_is_refused() -> None:
    result, _, _ = dicom_result()
    import dataclasses

    from histohelper.client.dicom_results import patch_annotations

    text, _ = source_json(100, 100)
    other = dataclasses.replace(result.dicom, source_image_json=text)
    with pytest.raises(ValueError, match="not the analysed level 0"):
        patch_annotations(dataclasses.replace(result, dicom=other))
