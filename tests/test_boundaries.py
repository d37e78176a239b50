"""Module boundaries from the house style, checked in fresh interpreters.

Each row imports one part in a subprocess and lists heavy modules that must not
have been imported as a side effect.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BOUNDARIES = [
    ("histohelper.errors", ["numpy", "grpc", "torch", "openslide", "cv2"]),
    ("histohelper.geometry", ["grpc", "torch", "openslide", "cv2"]),
    ("histohelper.cohort_csv", ["numpy", "grpc", "torch", "openslide", "cv2"]),
    # Region walk and outlines, shared by the tiler and the client's pictures: OpenCV
    # only inside the drawing functions, never Shapely (the client has none).
    ("histohelper.regions", ["grpc", "torch", "openslide", "cv2", "shapely"]),
    ("histohelper.v1.slide_analysis_pb2_grpc", ["torch", "openslide", "cv2", "numpy"]),
    (
        "histohelper.server.tiling",
        ["grpc", "torch", "histohelper.server.runtime", "prometheus_client"],
    ),
    (
        "histohelper.server.runtime",
        ["openslide", "cv2", "grpc", "torchvision", "prometheus_client"],
    ),
    # Stain normalisation: numpy and OpenCV only (no slide I/O, no gRPC, no torch).
    ("histohelper.server.tiling.stain", ["grpc", "torch", "openslide", "histohelper.v1"]),
    ("histohelper.server.pipeline", ["prometheus_client"]),
    ("histohelper.server.worker", ["prometheus_client"]),
    (
        "histohelper.server.servicer",
        ["histohelper.model_export", "histohelper.client", "torchvision"],
    ),
    (
        "histohelper.client",
        ["torch", "torchvision", "openslide", "histohelper.server", "cv2", "h5py", "shapely"],
    ),
    ("histohelper.client.cli", ["torch", "torchvision", "openslide", "histohelper.server", "h5py"]),
    ("histohelper.client.features", ["torch", "openslide", "histohelper.server", "h5py"]),
    # DICOM results and dicomweb:// slides: highdicom and pydicom only when objects are
    # built; the client never reads DICOM itself (wsidicom is the server's).
    (
        "histohelper.client.dicom_results",
        ["torch", "openslide", "histohelper.server", "cv2", "wsidicom", "highdicom", "pydicom"],
    ),
    # report.html: the pictures come from the rendering helper, imported lazily (cv2).
    ("histohelper.client.report", ["torch", "openslide", "histohelper.server", "cv2"]),
    (
        "histohelper.model_export.export",
        ["grpc", "histohelper.server.servicer", "histohelper.client"],
    ),
    ("histohelper.cli", ["torch", "torchvision", "openslide", "cv2"]),
]


@pytest.mark.parametrize(("module", "forbidden"), BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_import_boundary(module: str, forbidden: list[str]) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    leaked = [name for name in forbidden if name in loaded]
    assert not leaked, f"{module} imports {leaked}"
