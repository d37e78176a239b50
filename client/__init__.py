"""HistoHelper client SDK: thin (grpcio, protobuf, numpy; OpenCV only for rendering).

Never imports torch, torchvision or OpenSlide; importing this package does not import
OpenCV either (rendering imports it on first use).

Example::

    from histohelper.client import AnalysisOptions, SlideClient
    from histohelper.client.exports import save_all

    with SlideClient("127.0.0.1:50051") as client:
        result = client.analyze("real/CMU-1-Small-Region.svs", AnalysisOptions())
    save_all(result, "out/")         # overlay.png, heatmap.npz, tiles.geojson, summary.json ...
    tumor = result.heatmap("tumor")  # float32 [n_rows, n_cols], NaN where no patch
"""

from histohelper.client._channel import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES, RetryPolicy
from histohelper.client.aio import AsyncSlideClient
from histohelper.client.cohort import Backoff, CohortProgress, CohortSlide, SlideOutcome
from histohelper.client.dicomweb import DicomWebSlide, StoredDicom
from histohelper.client.errors import error_from_rpc
from histohelper.client.events import (
    Attention,
    Completed,
    DicomSource,
    Event,
    GridGeometry,
    InkFigure,
    ModelInfo,
    ModelSummary,
    PatchBatch,
    Progress,
    PyramidLevel,
    QualityControl,
    SlideInfo,
    SlidePrediction,
    SlideUncertainty,
    Started,
    Thumbnail,
    Timings,
    event_from_proto,
)
from histohelper.client.options import AnalysisOptions
from histohelper.client.result import PatchTable, ResultCollector, SlideResult
from histohelper.client.roi import RegionOfInterest
from histohelper.client.sync import SlideClient
from histohelper.client.uploads import UploadedSlide

__all__ = [
    "DEFAULT_MAX_RECEIVE_MESSAGE_BYTES",
    "AnalysisOptions",
    "AsyncSlideClient",
    "Attention",
    "Backoff",
    "CohortProgress",
    "CohortSlide",
    "Completed",
    "DicomSource",
    "DicomWebSlide",
    "Event",
    "GridGeometry",
    "InkFigure",
    "ModelInfo",
    "ModelSummary",
    "PatchBatch",
    "PatchTable",
    "Progress",
    "PyramidLevel",
    "QualityControl",
    "RegionOfInterest",
    "ResultCollector",
    "RetryPolicy",
    "SlideClient",
    "SlideInfo",
    "SlideOutcome",
    "SlidePrediction",
    "SlideResult",
    "SlideUncertainty",
    "Started",
    "StoredDicom",
    "Thumbnail",
    "Timings",
    "UploadedSlide",
    "error_from_rpc",
    "event_from_proto",
]
