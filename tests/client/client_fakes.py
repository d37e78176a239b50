"""Hand-built AnalyzeSlide streams (real protobuf messages) and a scripted gRPC server.

The scripted server is a real ``grpc.server`` on 127.0.0.1:0 whose servicer replays
prepared messages or aborts with a ``google.rpc.Status`` carrying an ErrorInfo, so the
client is tested over the wire without the model server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import cv2
import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from histohelper.errors import ERROR_DOMAIN, HistoHelperError
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

CLASSES = ("tumor", "stroma", "other")


@dataclass
class StreamSpec:
    """A synthetic analysis: a grid, which cells hold patches, and the boxes' geometry."""

    n_rows: int = 4
    n_cols: int = 5
    cells: list[tuple[int, int]] | None = None  # default: a fixed irregular pattern
    origin_l0: tuple[float, float] = (3.25, 5.5)
    stride_l0: tuple[float, float] = (100.7, 99.3)
    patch_l0: tuple[float, float] = (100.7, 99.3)
    slide_l0: tuple[int, int] = (480, 380)
    thumb_px: tuple[int, int] = (173, 137)  # width, height
    classes: tuple[str, ...] = CLASSES
    batch_size: int = 3
    attention: bool = True
    embeddings: int = 0
    no_tissue: bool = False
    untrained: bool = True
    failed: tuple[int, ...] = ()  # bag indices that fail to read
    request_id: str = "req-1"
    seed: int = 0

    def patch_cells(self) -> list[tuple[int, int]]:
        if self.no_tissue:
            return []
        if self.cells is not None:
            return sorted(self.cells)
        return sorted(
            (r, c)
            for r in range(self.n_rows)
            for c in range(self.n_cols)
            if (r * 7 + c * 3) % 5 != 0
        )


@dataclass
class Expected:
    """Ground truth of a built stream, per bag index of patches with results."""

    patch_index: np.ndarray
    row: np.ndarray
    col: np.ndarray
    boxes: np.ndarray  # float64 [n, 4] x, y, w, h level-0
    probabilities: np.ndarray  # float32 [n, C]
    attention: np.ndarray  # float32 [n]
    thumbnail_rgb: np.ndarray


def thumbnail_png(width: int, height: int) -> tuple[bytes, np.ndarray]:
    """A pale pink 'slide' with a darker blob, as PNG bytes and RGB array."""
    rgb = np.full((height, width, 3), (236, 226, 234), np.uint8)
    cv2.ellipse(
        rgb, (width // 2, height // 2), (width // 3, height // 3), 0, 0, 360, (180, 90, 160), -1
    )
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes(), rgb


def build_stream(spec: StreamSpec) -> tuple[list[pb.AnalyzeSlideResponse], Expected]:
    """Messages of one AnalyzeSlide stream, in protocol order, and what they encode.

    Boxes are deliberately perturbed from the nominal grid (edge patches clipped) so a
    client that recomputes boxes from indices gets them wrong.
    """
    rng = np.random.default_rng(spec.seed)
    cells = spec.patch_cells()
    n_bag = len(cells)
    png, rgb = thumbnail_png(*spec.thumb_px)
    scale_x = spec.slide_l0[0] / spec.thumb_px[0]
    scale_y = spec.slide_l0[1] / spec.thumb_px[1]
    mask = np.zeros((spec.thumb_px[1], spec.thumb_px[0]), np.uint8)
    ok, mask_png = cv2.imencode(".png", mask)
    assert ok
    started = pb.AnalysisStarted(
        request_id=spec.request_id,
        slide=pb.SlideInfo(
            vendor="aperio",
            width_l0=spec.slide_l0[0],
            height_l0=spec.slide_l0[1],
            levels=[pb.PyramidLevel(width_px=spec.slide_l0[0], height_px=spec.slide_l0[1])],
            mpp_x=0.499,
            mpp_y=0.499,
        ),
        grid=pb.GridGeometry(
            n_rows=spec.n_rows,
            n_cols=spec.n_cols,
            origin_x_l0=spec.origin_l0[0],
            origin_y_l0=spec.origin_l0[1],
            stride_x_l0=spec.stride_l0[0],
            stride_y_l0=spec.stride_l0[1],
            patch_width_l0=spec.patch_l0[0],
            patch_height_l0=spec.patch_l0[1],
            patch_size_px=224,
            stride_px=224,
            effective_mpp=0.5,
            mpp_source="metadata",
            edge_mode=pb.EDGE_MODE_PAD,
            min_tissue_fraction=0.5,
            patch_count=n_bag,
        ),
        model=pb.ModelSummary(
            name="fake-model",
            version="0.0.1",
            patch_classes=list(spec.classes),
            slide_classes=["negative", "positive"],
            untrained=spec.untrained,
            precision="fp32",
            device="cpu",
            patch_size_px=224,
            target_mpp=0.5,
            embedding_dim=spec.embeddings or 8,
        ),
        qc=pb.QualityControl(tissue_fraction=0.42, patch_count=n_bag),
        thumbnail=pb.Thumbnail(
            png=png,
            width_px=spec.thumb_px[0],
            height_px=spec.thumb_px[1],
            scale_x=scale_x,
            scale_y=scale_y,
        ),
        tissue_mask_png=mask_png.tobytes(),
        tiling_s=0.01,
    )
    msgs = [pb.AnalyzeSlideResponse(started=started)]

    ok_index = [i for i in range(n_bag) if i not in set(spec.failed)]
    boxes = np.zeros((n_bag, 4))
    for i, (r, c) in enumerate(cells):
        x = spec.origin_l0[0] + c * spec.stride_l0[0]
        y = spec.origin_l0[1] + r * spec.stride_l0[1]
        w = min(spec.patch_l0[0], spec.slide_l0[0] - x + 7.125)  # clipped edge patches
        h = min(spec.patch_l0[1], spec.slide_l0[1] - y + 3.375)
        boxes[i] = (x, y, w, h)
    num_c = len(spec.classes)
    logits = rng.normal(size=(n_bag, num_c))
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    att = rng.random(len(ok_index)).astype(np.float64)
    att = (att / att.sum()).astype(np.float32) if len(ok_index) else att.astype(np.float32)

    done = 0
    for start in range(0, n_bag, spec.batch_size):
        batch = list(range(start, min(n_bag, start + spec.batch_size)))
        good = [i for i in batch if i in ok_index]
        res = pb.PatchResults(
            patch_index=good,
            row=[cells[i][0] for i in good],
            col=[cells[i][1] for i in good],
            x_l0=[boxes[i, 0] for i in good],
            y_l0=[boxes[i, 1] for i in good],
            width_l0=[boxes[i, 2] for i in good],
            height_l0=[boxes[i, 3] for i in good],
            tissue_fraction=[0.5 + 0.5 * (i % 2) for i in good],
            is_edge=[boxes[i, 2] < spec.patch_l0[0] for i in good],
            num_classes=num_c,
            probabilities=probs[good].ravel().tolist(),
            failed_patch_index=[i for i in batch if i not in ok_index],
        )
        if spec.embeddings:
            res.embedding_dim = spec.embeddings
            res.embeddings.extend(rng.normal(size=len(good) * spec.embeddings).tolist())
        msgs.append(pb.AnalyzeSlideResponse(patches=res))
        done += len(batch)
        msgs.append(
            pb.AnalyzeSlideResponse(
                progress=pb.AnalysisProgress(
                    patches_done=done, patches_total=n_bag, elapsed_s=0.01 * done
                )
            )
        )
    if spec.attention and ok_index:
        for start in range(0, len(ok_index), 4):
            chunk = ok_index[start : start + 4]
            msgs.append(
                pb.AnalyzeSlideResponse(
                    attention=pb.AttentionChunk(
                        patch_index=chunk,
                        attention=att[start : start + len(chunk)].tolist(),
                    )
                )
            )
    completed = pb.AnalysisCompleted(
        request_id=spec.request_id,
        outcome=pb.ANALYSIS_OUTCOME_NO_TISSUE if not ok_index else pb.ANALYSIS_OUTCOME_COMPLETED,
        qc=pb.QualityControl(
            tissue_fraction=0.0 if spec.no_tissue else 0.42,
            patch_count=len(ok_index),
            failed_patch_count=len(spec.failed),
        ),
        timings=pb.Timings(tiling_s=0.01, inference_s=0.2, total_s=0.25, patches_per_s=40.0),
    )
    if ok_index:
        completed.prediction.CopyFrom(
            pb.SlidePrediction(
                class_names=["negative", "positive"],
                logits=[0.1, 0.4],
                probabilities=[0.4256, 0.5744],
                predicted_class="positive",
            )
        )
    msgs.append(pb.AnalyzeSlideResponse(completed=completed))
    ok = np.asarray(ok_index, dtype=np.int64)
    expected = Expected(
        patch_index=ok.astype(np.int32),
        row=np.asarray([cells[i][0] for i in ok_index], np.int32),
        col=np.asarray([cells[i][1] for i in ok_index], np.int32),
        boxes=boxes[ok] if len(ok) else np.zeros((0, 4)),
        probabilities=probs[ok] if len(ok) else np.zeros((0, num_c), np.float32),
        attention=att if spec.attention else np.full(len(ok), np.nan, np.float32),
        thumbnail_rgb=rgb,
    )
    return msgs, expected


def status_for(error: HistoHelperError, request_id: str = "req-err") -> grpc.Status:
    """The status the server sends for ``error``: code, message, ErrorInfo detail."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata={"request_id": request_id}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(
        status_pb2.Status(
            code=getattr(code_pb2, error.code), message=error.message, details=[detail]
        )
    )


@dataclass
class Script:
    """What the scripted servicer does next; shared with the test thread."""

    messages: list[pb.AnalyzeSlideResponse] = field(default_factory=list)
    abort_with: grpc.Status | None = None
    abort_after: int = 0  # messages sent before aborting
    unavailable_first: int = 0  # calls answered UNAVAILABLE (no details) first
    block_after: int | None = None  # send this many, then wait for cancellation
    model_info: pb.GetModelInfoResponse | None = None
    calls: int = 0
    received_metadata: list[dict[str, str]] = field(default_factory=list)
    requests: list[pb.AnalyzeSlideRequest] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)


class ScriptedServicer(pb_grpc.SlideAnalysisServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def _enter(self, context: grpc.ServicerContext) -> None:
        s = self.script
        s.calls += 1
        s.received_metadata.append(dict(context.invocation_metadata()))
        if s.unavailable_first > 0:
            s.unavailable_first -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    def AnalyzeSlide(  # noqa: N802 - gRPC method name
        self, request: pb.AnalyzeSlideRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AnalyzeSlideResponse]:
        s = self.script
        self._enter(context)
        s.requests.append(request)
        context.add_callback(s.cancelled.set)
        for i, msg in enumerate(s.messages):
            if s.abort_with is not None and i == s.abort_after:
                context.abort_with_status(s.abort_with)
            if s.block_after is not None and i == s.block_after:
                s.cancelled.wait(10)
                return
            yield msg
        if s.abort_with is not None:
            context.abort_with_status(s.abort_with)

    def GetModelInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        s = self.script
        self._enter(context)
        if s.abort_with is not None:
            context.abort_with_status(s.abort_with)
        return s.model_info or model_info()


def model_info() -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        model=pb.ModelSummary(
            name="fake-model",
            version="0.0.1",
            patch_classes=list(CLASSES),
            slide_classes=["negative", "positive"],
            untrained=True,
            precision="fp32",
            device="cpu",
            patch_size_px=224,
            target_mpp=0.5,
            embedding_dim=8,
        ),
        manifest_json='{"format": "histohelper-model", "classes": ["tumor", "stroma", "other"]}',
        default_batch_size=32,
        max_concurrent_analyses=2,
    )


@dataclass
class ScriptedServer:
    server: grpc.Server
    target: str
    script: Script


def start_scripted_server(script: Script | None = None) -> ScriptedServer:
    script = script or Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SlideAnalysisServiceServicer_to_server(ScriptedServicer(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return ScriptedServer(server, f"127.0.0.1:{port}", script)


@dataclass
class PlainStatus(grpc.Status):
    """A status without rich details (what a foreign server or proxy sends)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple = ()


def collect_result(**spec: object):  # -> histohelper.client.SlideResult
    """The :class:`~histohelper.client.SlideResult` of a built stream (``StreamSpec(**spec)``),
    assembled by the real ``ResultCollector``."""
    from histohelper.client import ResultCollector, event_from_proto

    msgs, _ = build_stream(StreamSpec(**spec))  # type: ignore[arg-type]
    collector = ResultCollector()
    for m in msgs:
        collector.add(event_from_proto(m))
    return collector.result()
