"""Test helpers for DICOM result objects: a real source image as DICOM JSON, and the
expected slide coordinates of level-0 points computed from DICOM attributes (not with
highdicom, the library under test).

Expected slide coordinates: level-0 point (x, y) (continuous, (0, 0) the top left
corner of the total pixel matrix) -> origin + (x - 0.5) * column spacing * row
direction + (y - 0.5) * row spacing * column direction, in mm (PS3.3 C.7.6.2.1.1 with
the Total Pixel Matrix Origin at the centre of the first pixel, highdicom's convention).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

BOXES = Path(__file__).resolve().parents[1] / ".." / "shared" / "slides" / "dicom-boxes"
#: Where tests move the real source's Total Pixel Matrix Origin, mm.
ORIGIN_MM = (20.5, 40.25)


def source_json(width: int, height: int) -> tuple[str, Any]:
    """DICOM JSON (no bulk data) of the real ``dicom-boxes/boxes_0.dcm`` with a
    ``width x height`` total pixel matrix and its origin moved to :data:`ORIGIN_MM`;
    also the pydicom Dataset."""
    import pydicom

    path = BOXES / "boxes_0.dcm"
    if not path.is_file():
        pytest.skip(f"the real DICOM series is missing: {path}")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    origin = ds.TotalPixelMatrixOriginSequence[0]
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = ORIGIN_MM
    return ds.to_json(), ds


def expected_slide_mm(ds: Any, xy_l0: np.ndarray) -> np.ndarray:
    """Level-0 (x, y) float64 ``[n, 2]`` -> slide (x, y, z) mm ``[n, 3]`` of image ``ds``."""
    o = ds.TotalPixelMatrixOriginSequence[0]
    origin = np.array(
        [
            float(o.XOffsetInSlideCoordinateSystem),
            float(o.YOffsetInSlideCoordinateSystem),
            float(o.get("ZOffsetInSlideCoordinateSystem", 0.0) or 0.0),
        ]
    )
    cosines = np.array([float(v) for v in ds.ImageOrientationSlide])
    along_x, along_y = cosines[:3], cosines[3:]
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    row_mm, col_mm = (float(v) for v in spacing)
    x, y = xy_l0[:, :1] - 0.5, xy_l0[:, 1:] - 0.5
    return origin + x * col_mm * along_x + y * row_mm * along_y


def box_corners(x: np.ndarray, y: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Corners float64 ``[n, 4, 2]`` of level-0 boxes, clockwise from the top left."""
    return np.stack(
        [
            np.stack([x, y], 1),
            np.stack([x + w, y], 1),
            np.stack([x + w, y + h], 1),
            np.stack([x, y + h], 1),
        ],
        1,
    )
