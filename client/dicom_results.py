"""A slide result as DICOM objects that reference the source slide (highdicom).

For a slide read from DICOM (``SlideResult.dicom``: a DICOMweb series or DICOM WSI
files) this module builds, with highdicom (Herrmann et al., J Pathol Inform 2018;
the ``dicom`` extra):

- a **Microscopy Bulk Simple Annotations** object (:func:`patch_annotations`): one
  POLYGON per analysed patch, its four corners the patch's exact level-0 box as the
  server sent it; one annotation group per *predicted* patch class (argmax of the
  patch's probabilities), each annotation with the measurements ``probability of
  <class>`` for every patch class and ``MIL attention`` (when the result has attention).
- floating-point **Parametric Maps** (:func:`probability_maps`): the probability
  heatmap at the grid's resolution, one instance per patch class (one series), in
  the source slide's frame of reference.
- a **Comprehensive 3D SR** (:func:`slide_report`), a TID 1500 Measurement Report of
  the slide-level prediction: the predicted class, the probability of every slide
  class, the Monte-Carlo dropout figures when present, the model as algorithm and
  observer device (name, version).

The same prediction, uncertainty and model are also text in the other objects: the
annotation groups' Annotation Group Description and the maps' Image Comments hold the
whole text (:func:`prediction_text`), Content Description and Series Description a
64-character summary; every annotation group carries the model as its Algorithm
Identification (name, version, family "Artificial Intelligence").

All objects join the source study (its Study Instance UID and patient), share its
Frame of Reference UID and reference its level-0 image (Referenced Image Sequence /
Source Image Sequence); each is its own new series. Their UIDs are derived from the
source series, the model and the effective options (:func:`result_uid`), so the same
result built again has the same Series and SOP Instance UIDs (a re-store replaces).

Coordinate frames and units:

- level-0 px: the patch boxes of :class:`~histohelper.client.result.PatchTable`,
  continuous coordinates of the level-0 image's total pixel matrix, (0, 0) the top
  left corner of its top left pixel, x right (columns), y down (rows). The server's
  level 0 is the source image of ``DicomSource.source_image_json``.
- slide coordinates (SCOORD3D, the default): millimetres in the DICOM slide
  coordinate system of the Frame of Reference, mapped from level-0 px with the
  source image's Image Orientation (Slide), Total Pixel Matrix Origin Sequence and
  Pixel Spacing by highdicom's
  :class:`highdicom.spatial.ImageToReferenceTransformer` (its convention: the origin
  is the centre of the first pixel).
- with ``coordinates="2D"`` the annotations are in level-0 px instead (SCOORD,
  (column, row) of the total pixel matrix, same origin as above).
- the parametric map's pixel (r, c) is grid cell (row r, col c): its centre is the
  centre of that cell's patch, its spacing the grid stride (level-0 stride x the
  source's pixel spacing, mm), its orientation the source's. Cells without a patch
  hold :data:`NO_PATCH` (declared as Float Pixel Padding Value).

Only numpy, pydicom and highdicom; imported lazily by
:meth:`SlideResult.to_dicom <histohelper.client.result.SlideResult.to_dicom>`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from histohelper import __version__

if TYPE_CHECKING:
    import pydicom

    from histohelper.client.events import DicomSource
    from histohelper.client.result import SlideResult

#: Value of parametric-map cells without an analysed patch (Float Pixel Padding Value).
NO_PATCH = -1.0
#: Private coding scheme of the measurement and class codes.
CODING_SCHEME = "99HISTOHELPER"
#: Series numbers of the new series (annotations, maps, report).
SERIES_NUMBERS = (9101, 9102, 9103)
MANUFACTURER = "HistoHelper"
#: Largest frame side of the parametric map, px.
MAP_TILE_PX = 256

Coordinates = Literal["2D", "3D"]


def _hd() -> Any:
    """highdicom, or an ImportError naming the extra."""
    try:
        import highdicom
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "DICOM result objects need highdicom: install the 'dicom' extra "
            "(pip install 'histohelper[dicom] @ git+<repository URL>'; README: Install)"
        ) from exc
    return highdicom


# --- the source image -----------------------------------------------------------------


def source_dataset(dicom: DicomSource) -> pydicom.Dataset:
    """The level-0 source image's attributes as a pydicom Dataset (no pixel data).

    Built with ``pydicom.Dataset.from_json`` from ``dicom.source_image_json``; bulk data
    references are dropped; UIDs missing from the JSON are taken from ``dicom``.

    Raises:
        ValueError: the JSON is not a DICOM JSON object, or lacks what the result
            objects need (SOP Class and Instance UID, Total Pixel Matrix size, Image
            Orientation (Slide), Total Pixel Matrix Origin Sequence, Pixel Spacing).
    """
    import pydicom

    try:
        ds = pydicom.Dataset.from_json(
            dicom.source_image_json, bulk_data_uri_handler=lambda *_: b""
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"DicomSource.source_image_json is not DICOM JSON: {exc}") from None
    for keyword in (
        "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ICCProfile",
        "PerFrameFunctionalGroupsSequence", "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
    ):  # fmt: skip
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in (
        ("StudyInstanceUID", dicom.study_instance_uid),
        ("SeriesInstanceUID", dicom.series_instance_uid),
        ("FrameOfReferenceUID", dicom.frame_of_reference_uid),
    ):
        if value and keyword not in ds:
            setattr(ds, keyword, value)
    required = (
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
        "FrameOfReferenceUID", "TotalPixelMatrixColumns", "TotalPixelMatrixRows",
        "ImageOrientationSlide", "TotalPixelMatrixOriginSequence",
    )  # fmt: skip
    missing = [k for k in required if k not in ds]
    if missing:
        raise ValueError(f"the source image's DICOM JSON lacks {', '.join(missing)}")
    pixel_spacing_mm(ds)  # raises when missing
    return ds


def pixel_spacing_mm(source: pydicom.Dataset) -> tuple[float, float]:
    """The source image's (row spacing, column spacing) in mm: the vertical distance
    between rows (level-0 y) and the horizontal distance between columns (level-0 x).

    Raises:
        ValueError: no Pixel Spacing in the Shared Functional Groups (or top level).
    """
    try:
        measures = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        spacing = measures.PixelSpacing
    except (AttributeError, IndexError):
        spacing = source.get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        raise ValueError("the source image has no Pixel Spacing")
    return float(spacing[0]), float(spacing[1])


def _slice_thickness_mm(source: pydicom.Dataset) -> float:
    try:
        value = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
    except (AttributeError, IndexError):
        value = None
    return float(value) if value else 0.001  # 1 um where the scanner left it out


def level0_to_slide(
    source: pydicom.Dataset, xy_l0: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Map level-0 px to slide coordinates.

    Args:
        source: the level-0 source image (:func:`source_dataset`).
        xy_l0: float64 ``[n, 2]`` (x, y) in level-0 px of the total pixel matrix.

    Returns:
        float64 ``[n, 3]`` (x, y, z) in mm in the frame of reference's slide
        coordinate system (highdicom's ImageToReferenceTransformer).
    """
    hd = _hd()
    transformer = hd.spatial.ImageToReferenceTransformer.for_image(
        source, for_total_pixel_matrix=True
    )
    return np.asarray(transformer(np.asarray(xy_l0, np.float64).reshape(-1, 2)), np.float64)


def patch_corners_l0(result: SlideResult) -> npt.NDArray[np.float64]:
    """The four corners of every patch's level-0 box, clockwise from the top left.

    Returns:
        float64 ``[n, 4, 2]`` (x, y) in level-0 px: (x, y), (x + w, y), (x + w, y + h),
        (x, y + h) of each row of ``result.patches``.
    """
    p = result.patches
    x0, y0 = p.x_l0, p.y_l0
    x1, y1 = p.x_l0 + p.width_l0, p.y_l0 + p.height_l0
    return np.stack([np.stack(c, axis=1) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], axis=1)


# --- texts ----------------------------------------------------------------------------


def model_text(result: SlideResult) -> str:
    """``"<name> <version>"`` of the served model, ``" [UNTRAINED]"`` appended when it is."""
    text = f"{result.model.name} {result.model.version}".strip() or "unnamed model"
    return text + (" [UNTRAINED]" if result.model.untrained else "")


def prediction_text(result: SlideResult) -> str:
    """The slide-level prediction, its uncertainty and the model, as one paragraph.

    E.g. ``"Slide prediction: tumor (p=0.912; normal 0.088, tumor 0.912). MC dropout (8
    passes): p=0.905±0.031, entropy 0.301 nats. Model: histo-resnet 1.2.0. HistoHelper
    0.9.0, request r-17."``
    """
    p = result.prediction
    if p is None:
        head = "No slide prediction (" + result.outcome.replace("_", " ") + ")."
    else:
        pairs = zip(p.class_names, p.probabilities, strict=True)
        probs = ", ".join(f"{c} {v:.3f}" for c, v in pairs)
        head = f"Slide prediction: {p.predicted_class} (p={p.probability:.3f}; {probs})."
        if p.uncertainty is not None:
            head += f" {p.uncertainty_text()}."
    return (
        f"{head} Model: {model_text(result)}. Patches: {result.patch_count} at "
        f"{result.grid.effective_mpp:.3g} um/px. HistoHelper {__version__}, request "
        f"{result.request_id}."
    )


def summary_text(result: SlideResult, what: str) -> str:
    """At most 64 characters (a DICOM LO): ``"<what>: <class> p=0.912"``."""
    p = result.prediction
    tail = f"{p.predicted_class} p={p.probability:.3f}" if p is not None else "no prediction"
    return f"{what}: {tail}"[:64]


def _code(value: str, meaning: str) -> Any:
    from pydicom.sr.coding import Code

    return Code(value, CODING_SCHEME, meaning[:64])


def result_identity(result: SlideResult) -> list[str]:
    """What makes a result what it is, as strings: the source study and series UIDs,
    the model (name, version, artifact SHA-256) and the effective options (the grid as
    served: level, patch size, stride, mpp, edge mode, tissue threshold ...; stain
    normalisation method and reference; region of interest digest; MC dropout passes;
    attention or not). Equal for a re-run or cached replay of the same analysis."""
    d = result.dicom
    m = result.model
    p = result.prediction
    passes = p.uncertainty.passes if p is not None and p.uncertainty is not None else 0
    stain = result.stain
    options = {
        "grid": dataclasses.asdict(result.grid),
        "stain": [stain.method, stain.reference] if stain is not None else None,
        "roi": result.roi.sha256() if result.roi is not None else None,
        "mc_dropout_passes": passes,
        "attention": result.has_attention,
    }
    return [
        "histohelper-result/1",
        d.study_instance_uid if d is not None else "",
        d.series_instance_uid if d is not None else "",
        m.name,
        m.version,
        m.artifact_sha256,
        json.dumps(options, sort_keys=True, default=str),
    ]


def result_uid(result: SlideResult, *parts: object) -> str:
    """A UID derived from :func:`result_identity` and ``parts`` (object kind, class
    index ...): ``pydicom.uid.generate_uid(entropy_srcs=...)``, the pydicom root plus a
    SHA-512 of them. Storing the same result again (a re-run after a failed or timed-out
    STOW-RS) therefore sends the same Series and SOP Instance UIDs, which the PACS
    stores once instead of adding series; another model, version or option gives
    other UIDs."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[*result_identity(result), *map(str, parts)]))


def _common(result: SlideResult, series_number: int, kind: str) -> dict[str, Any]:
    """Equipment and identity arguments shared by the objects' constructors; the UIDs
    are :func:`result_uid` of ``kind`` (one series per kind)."""
    return {
        "series_instance_uid": result_uid(result, kind, "series"),
        "series_number": series_number,
        "sop_instance_uid": result_uid(result, kind, "instance", 0),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": model_text(result)[:64],
        "software_versions": f"histohelper {__version__}",
        "device_serial_number": (result.model.version or "-")[:64],
    }


# --- annotations ----------------------------------------------------------------------


def patch_annotations(
    result: SlideResult,
    source: pydicom.Dataset | None = None,
    *,
    coordinates: Coordinates = "3D",
    series_number: int = SERIES_NUMBERS[0],
) -> Any:
    """Microscopy Bulk Simple Annotations: one polygon per analysed patch.

    Groups: one per predicted patch class that has patches (label = class name, in
    class order), annotations in ``patch_index`` order within a group. Measurements of
    each annotation: ``PROB<i>`` "Probability of <class i>" (unit 1, float32, the
    served softmax value) for every patch class, and ``ATTENTION`` "MIL attention"
    (unit 1; the weights sum to 1 over the bag) when the result has attention.

    Args:
        result: a completed result of a slide read from DICOM.
        source: the level-0 source image (default: :func:`source_dataset` of
            ``result.dicom``).
        coordinates: ``"3D"`` (slide coordinates in mm, SCOORD3D) or ``"2D"`` (level-0
            px of the source's total pixel matrix).
        series_number: Series Number of the new series.

    Returns:
        A ``highdicom.ann.MicroscopyBulkSimpleAnnotations`` (a pydicom Dataset).

    Raises:
        ValueError: no DICOM source, no patches, or a level 0 that is not the source's.
    """
    hd = _hd()
    from pydicom.sr.codedict import codes

    source = _checked_source(result, source)
    corners = patch_corners_l0(result)
    n = len(result.patches)
    if coordinates == "3D":
        graphic = level0_to_slide(source, corners.reshape(-1, 2)).reshape(n, 4, 3)
    elif coordinates == "2D":
        graphic = corners
    else:
        raise ValueError(f"coordinates must be '2D' or '3D', got {coordinates!r}")
    probs = result.patches.probabilities
    predicted = np.argmax(probs, axis=1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=(result.model.name or "unnamed model")[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=(result.model.version or "-")[:64],
        parameters={
            "effective_mpp": f"{result.grid.effective_mpp:.6g}",
            "patch_size_px": str(result.grid.patch_size_px),
            "stride_px": str(result.grid.stride_px),
            "untrained": str(result.model.untrained).lower(),
        },
    )
    unit = codes.UCUM.NoUnits
    description = prediction_text(result)
    groups: list[Any] = []
    for k, name in enumerate(result.class_names):
        rows = np.flatnonzero(predicted == k)
        if rows.size == 0:
            continue
        measurements = [
            hd.ann.Measurements(
                name=_code(f"PROB{i}", f"Probability of {c}"),
                values=probs[rows, i].astype(np.float32),
                unit=unit,
            )
            for i, c in enumerate(result.class_names)
        ]
        if result.has_attention:
            measurements.append(
                hd.ann.Measurements(
                    name=_code("ATTENTION", "MIL attention"),
                    values=result.patches.attention[rows].astype(np.float32),
                    unit=unit,
                )
            )
        groups.append(
            hd.ann.AnnotationGroup(
                number=len(groups) + 1,
                uid=result_uid(result, "annotations", "group", k),
                label=name[:64],
                annotated_property_category=codes.SCT.Tissue,
                annotated_property_type=_code(f"CLASS{k}", name),
                graphic_type=hd.ann.GraphicTypeValues.POLYGON,
                graphic_data=[graphic[r] for r in rows],
                algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                measurements=measurements,
                description=f"Patches whose most probable class is {name}. {description}",
            )
        )
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type=coordinates,
        annotation_groups=groups,
        content_description=summary_text(result, "HistoHelper patches"),
        content_label="HH_PATCHES",
        **_common(result, series_number, "annotations"),
    )
    ann.SeriesDescription = summary_text(result, f"HistoHelper {result.model.name} patches")
    return ann


def _checked_source(result: SlideResult, source: pydicom.Dataset | None) -> pydicom.Dataset:
    if source is None:
        if result.dicom is None:
            raise ValueError(
                "the slide was not read from DICOM (no DicomSource): DICOM result objects "
                "need a dicomweb:// series or DICOM WSI files"
            )
        source = source_dataset(result.dicom)
    if len(result.patches) == 0:
        raise ValueError(f"the result has no patches ({result.outcome}): nothing to annotate")
    size = (int(source.TotalPixelMatrixColumns), int(source.TotalPixelMatrixRows))
    if size != (result.slide.width_l0, result.slide.height_l0):
        raise ValueError(
            f"the source image's total pixel matrix {size[0]} x {size[1]} is not the "
            f"analysed level 0 ({result.slide.width_l0} x {result.slide.height_l0})"
        )
    return source


# --- the probability map --------------------------------------------------------------


def map_geometry(
    result: SlideResult, source: pydicom.Dataset
) -> tuple[npt.NDArray[np.float64], tuple[float, float]]:
    """Position and spacing of the parametric map's pixel matrix.

    Returns:
        ``(centre_l0, spacing_mm)``: float64 ``[2]`` (x, y) level-0 px of the centre of
        map pixel (0, 0) (the centre of grid cell (0, 0)'s patch), and (row spacing,
        column spacing) in mm (the grid stride times the source's pixel spacing).
    """
    g = result.grid
    centre = np.array(
        [g.origin_x_l0 + g.patch_width_l0 / 2.0, g.origin_y_l0 + g.patch_height_l0 / 2.0]
    )
    row_mm, col_mm = pixel_spacing_mm(source)
    return centre, (g.stride_y_l0 * row_mm, g.stride_x_l0 * col_mm)


def probability_maps(
    result: SlideResult,
    source: pydicom.Dataset | None = None,
    *,
    series_number: int = SERIES_NUMBERS[1],
) -> list[Any]:
    """Parametric Maps (float32): the probability heatmap at the grid's resolution.

    One single-channel instance per patch class (instance number = class index + 1),
    all in one new series: pixel matrix ``n_rows x n_cols`` (pixel (r, c) = grid cell
    (r, c)) holding that class's patch probability (Real World Value Mapping: label =
    class name, unit 1, range [0, 1]); cells without a patch hold :data:`NO_PATCH`.
    Registered as the module docstring says; tiled in frames of at most
    :data:`MAP_TILE_PX` px. (One instance per class rather than one multi-channel
    instance: highdicom indexes tiled frames by position only, so channels at one
    position could not be told apart by their dimension index.)

    Args:
        result: a completed result of a slide read from DICOM.
        source: the level-0 source image (default: from ``result.dicom``).
        series_number: Series Number of the new series.

    Returns:
        ``highdicom.pm.ParametricMap`` objects (pydicom Datasets), in class order.

    Raises:
        ValueError: no DICOM source, no patches, or a level 0 that is not the source's.
    """
    hd = _hd()
    from pydicom.sr.codedict import codes

    source = _checked_source(result, source)
    heat = np.nan_to_num(result.heatmaps.astype(np.float32), nan=NO_PATCH)  # [C, R, Cols]
    centre_l0, (row_mm, col_mm) = map_geometry(result, source)
    position = level0_to_slide(source, centre_l0[np.newaxis])[0]
    n_rows, n_cols = result.grid.n_rows, result.grid.n_cols
    common = _common(result, series_number, "maps")
    maps = []
    for k, name in enumerate(result.class_names):
        mapping = hd.pm.RealWorldValueMapping(
            lut_label=name[:16],
            lut_explanation=f"Probability of {name}"[:64],
            unit=codes.UCUM.NoUnits,
            value_range=(0.0, 1.0),
            slope=1.0,
            intercept=0.0,
        )
        pm = hd.pm.ParametricMap(
            source_images=[source],
            pixel_array=np.ascontiguousarray(heat[k]),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            pixel_measures=hd.PixelMeasuresSequence(
                pixel_spacing=(row_mm, col_mm), slice_thickness=_slice_thickness_mm(source)
            ),
            plane_orientation=hd.PlaneOrientationSequence(
                coordinate_system="SLIDE",
                image_orientation=[float(v) for v in source.ImageOrientationSlide],
            ),
            plane_positions=[
                hd.PlanePositionSequence(
                    coordinate_system="SLIDE",
                    image_position=[float(v) for v in position],
                    pixel_matrix_position=(1, 1),
                )
            ],
            tile_pixel_array=True,
            tile_size=(min(n_rows, MAP_TILE_PX), min(n_cols, MAP_TILE_PX)),
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            content_description=f"Probability of {name}"[:64],
            content_label="HH_HEATMAP",
            **{
                **common,
                "sop_instance_uid": result_uid(result, "maps", "instance", k),
                "instance_number": k + 1,
            },
        )
        pm.FloatPixelPaddingValue = NO_PATCH
        pm.ImageComments = (
            f"Patch probability of class {name} per grid cell ({NO_PATCH:g} where no patch "
            f"was analysed). {prediction_text(result)}"
        )
        pm.SeriesDescription = summary_text(result, f"HistoHelper {result.model.name} heatmap")
        maps.append(pm)
    return maps


# --- the slide-level report -----------------------------------------------------------


def slide_report(
    result: SlideResult,
    source: pydicom.Dataset | None = None,
    *,
    series_number: int = SERIES_NUMBERS[2],
) -> Any:
    """Comprehensive 3D SR, a TID 1500 Measurement Report of the slide-level prediction.

    One measurement group (tracking identifier "slide-level prediction", the level-0
    source image as its source, the model as algorithm: name, version, parameter
    ``untrained`` when it is) holding: the qualitative evaluation "Predicted slide
    class" (a code of :data:`CODING_SCHEME` whose meaning is the class name); the
    measurements "Probability of <slide class>" (unit 1) for every slide class; with
    Monte-Carlo dropout also "MC dropout mean probability of <class>", "MC dropout
    std of <class>" (unit 1, ddof 0), "Predictive entropy" (nats, UCUM ``{nats}``) and
    "MC dropout passes" (unit 1). Values are DICOM decimal strings (16 characters).

    Args:
        result: a completed result with a prediction, of a slide read from DICOM.
        source: the level-0 source image (default: from ``result.dicom``).
        series_number: Series Number of the new series.

    Returns:
        A ``highdicom.sr.Comprehensive3DSR`` (a pydicom Dataset).

    Raises:
        ValueError: no DICOM source, no patches, or no prediction.
    """
    hd = _hd()
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    source = _checked_source(result, source)
    p = result.prediction
    if p is None:
        raise ValueError(f"the result has no slide prediction ({result.outcome})")
    algorithm = hd.sr.AlgorithmIdentification(
        name=(result.model.name or "unnamed model")[:64],
        version=(result.model.version or "-")[:64],
        parameters=["untrained"] if result.model.untrained else None,
    )
    unit = codes.UCUM.NoUnits

    def number(value_code: str, meaning: str, value: float, unit: Any = unit) -> Any:
        return hd.sr.Measurement(
            name=_code(value_code, meaning), value=float(value), unit=unit, algorithm_id=algorithm
        )

    measurements = [
        number(f"SPROB{i}", f"Probability of {c}", v)
        for i, (c, v) in enumerate(zip(p.class_names, p.probabilities, strict=True))
    ]
    u = p.uncertainty
    if u is not None:
        for i, c in enumerate(p.class_names):
            measurements.append(
                number(f"MCMEAN{i}", f"MC dropout mean probability of {c}", u.mean[i])
            )
            measurements.append(number(f"MCSTD{i}", f"MC dropout std of {c}", u.std[i]))
        nats = Code("{nats}", "UCUM", "nats")
        measurements.append(number("ENTROPY", "Predictive entropy", u.entropy_nats, nats))
        measurements.append(number("MCPASSES", "MC dropout passes", u.passes))
    k = p.class_names.index(p.predicted_class) if p.predicted_class in p.class_names else 0
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(result, "report", "tracking"), identifier="slide-level prediction"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_code("PREDICTED", "Predicted slide class"),
                value=_code(f"SCLASS{k}", p.predicted_class),
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
        ],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid(result, "report", "device"),
            name=(result.model.name or "unnamed model")[:64],
            manufacturer_name=MANUFACTURER,
            model_name=(result.model.version or "-")[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("WSIANALYSIS", "Whole slide image analysis"),
        imaging_measurements=[group],
    )
    common = _common(result, series_number, "report")
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=common["series_instance_uid"],
        series_number=series_number,
        sop_instance_uid=common["sop_instance_uid"],
        instance_number=1,
        manufacturer=MANUFACTURER,
    )
    sr.SeriesDescription = summary_text(result, f"HistoHelper {result.model.name} report")
    return sr


# --- all objects, files and bytes -----------------------------------------------------


def result_objects(
    result: SlideResult, *, coordinates: Coordinates = "3D"
) -> list[pydicom.Dataset]:
    """The annotations (:func:`patch_annotations`), one probability map per patch class
    (:func:`probability_maps`) and, when the result has a slide prediction, the report
    (:func:`slide_report`); the order of :func:`file_names`.

    Raises:
        ValueError: the slide was not read from DICOM, or the result has no patches.
    """
    source = _checked_source(result, None)
    objects = [
        patch_annotations(result, source, coordinates=coordinates),
        *probability_maps(result, source),
    ]
    if result.prediction is not None:
        objects.append(slide_report(result, source))
    return objects


def file_names(result: SlideResult) -> list[str]:
    """``annotations.dcm``, ``probability_map_<k>.dcm`` per patch class index ``k``, then
    ``slide_report.dcm`` when the result has a slide prediction."""
    maps = [f"probability_map_{k}.dcm" for k in range(len(result.class_names))]
    report = ["slide_report.dcm"] if result.prediction is not None else []
    return ["annotations.dcm", *maps, *report]


def write_dicom(
    result: SlideResult,
    out_dir: str | Path,
    *,
    objects: Sequence[pydicom.Dataset] | None = None,
    coordinates: Coordinates = "3D",
) -> list[Path]:
    """Write the result objects as DICOM Part 10 files :func:`file_names` into ``out_dir``.

    Args:
        result: the result (its classes and prediction name the files).
        out_dir: the folder (created).
        objects: objects already built by :func:`result_objects`.
        coordinates: as :func:`patch_annotations`.

    Returns:
        The written paths.

    Raises:
        ValueError: as :func:`result_objects`.
        OSError: the files cannot be written.
    """
    objs = list(objects) if objects is not None else result_objects(result, coordinates=coordinates)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ds in zip(file_names(result), objs, strict=True):
        path = out / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def part10_bytes(ds: pydicom.Dataset) -> bytes:
    """A Dataset as DICOM Part 10 bytes (preamble, file meta, data set)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def export_dicom(
    result: SlideResult,
    out_dir: str | Path | None = None,
    *,
    store: Callable[[list[Any], str], Any] | None = None,
    coordinates: Coordinates = "3D",
) -> tuple[list[Path], Any]:
    """Build the result objects once; write them to ``out_dir`` and/or store them on the
    PACS the slide came from (what ``histohelper analyze --dicom-out DIR --stow`` does).

    Args:
        result: a completed result of a slide read from DICOM.
        out_dir: folder for the Part 10 files (:func:`write_dicom`), or ``None``.
        store: e.g. ``client.store_dicom``; called as ``store(objects,
            result.dicom.dicomweb_server)``, or ``None`` to store nothing.
        coordinates: as :func:`patch_annotations`.

    Returns:
        ``(written paths, store's answer or None)``.

    Raises:
        ValueError: not read from DICOM, no patches, or ``store`` for a slide read from
            local DICOM files (no DICOMweb server to send it back to).
        OSError: the files cannot be written.
        HistoHelperError: what ``store`` raises.
    """
    if store is not None and result.dicom is not None and not result.dicom.dicomweb_server:
        raise ValueError(
            "the slide was read from DICOM files, not from a PACS: there is no DICOMweb "
            "server to store the results on (analyse it as dicomweb://NAME/STUDY/SERIES)"
        )
    objects = result_objects(result, coordinates=coordinates)
    paths = write_dicom(result, out_dir, objects=objects) if out_dir is not None else []
    stored = None
    if store is not None:
        assert result.dicom is not None  # result_objects checked it
        stored = store(objects, result.dicom.dicomweb_server)
    return paths, stored
