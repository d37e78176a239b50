"""AnalyzeSlide and friends against a real server process on 127.0.0.1.

The server runs the session's artifact in fp32; its results are compared with the
same artifact run in-process on the same patches.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

CMU = "real/CMU-1-Small-Region.svs"


def stub_for(target: str) -> pb_grpc.SlideAnalysisServiceStub:
    channel = grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    )
    return pb_grpc.SlideAnalysisServiceStub(channel)


def analyze(target: str, path: str, **options: object) -> list[pb.AnalyzeSlideResponse]:
    request = pb.AnalyzeSlideRequest(slide_path=path, options=pb.AnalysisOptions(**options))
    return list(stub_for(target).AnalyzeSlide(request, timeout=300))


def error_of(target: str, path: str) -> tuple[grpc.StatusCode, str, str]:
    """Status code, ErrorInfo reason and message of a failing AnalyzeSlide."""
    with pytest.raises(grpc.RpcError) as info:
        analyze(target, path)
    err = info.value
    status = rpc_status.from_call(err)
    reason = ""
    if status is not None:
        for detail in status.details:
            ei = error_details_pb2.ErrorInfo()
            if detail.Unpack(ei):
                reason = ei.reason
    return err.code(), reason, err.details()


@pytest.fixture(scope="module")
def cmu_events(analysis_server) -> list[pb.AnalyzeSlideResponse]:
    return analyze(analysis_server.target, CMU, return_embeddings=True, return_attention=True)


def test_event_order_and_shapes(cmu_events) -> None:
    kinds = [e.WhichOneof("event") for e in cmu_events]
    assert kinds[0] == "started" and kinds[-1] == "completed"
    assert "patches" in kinds and "attention" in kinds
    first_attention = kinds.index("attention")
    assert all(k == "attention" for k in kinds[first_attention:-1])
    started = cmu_events[0].started
    assert started.slide.vendor == "aperio"
    assert started.grid.patch_count > 0
    assert started.thumbnail.width_px > 0 and started.thumbnail.png[:4] == b"\x89PNG"
    assert started.model.untrained is True
    done = cmu_events[-1].completed
    assert done.outcome == pb.ANALYSIS_OUTCOME_COMPLETED
    assert done.qc.patch_count == started.grid.patch_count
    assert list(done.prediction.class_names) == list(started.model.slide_classes)
    assert abs(sum(done.prediction.probabilities) - 1) < 1e-5
    seen = [i for e in cmu_events if e.HasField("patches") for i in e.patches.patch_index]
    assert sorted(seen) == list(range(started.grid.patch_count))
    for e in cmu_events:
        assert e.ByteSize() < 4 * 1024 * 1024


def test_probabilities_and_slide_prediction_match_in_process(
    cmu_events, served_runtime, real_slide
) -> None:
    """AnalyzeSlide's figures equal the same artifact run in-process (fp32, <= 1e-5)."""
    from histohelper.server.tiling import PatchReader, TilingOptions, open_slide, plan_tiling

    started = cmu_events[0].started
    manifest = served_runtime.manifest
    options = TilingOptions(patch_size_px=manifest.patch_size_px)
    with open_slide(real_slide) as slide:
        plan = plan_tiling(slide, options)
    assert len(plan.grid) == started.grid.patch_count
    n, c = len(plan.grid), len(manifest.patch_classes)
    server_probs = np.full((n, c), np.nan, np.float32)
    server_emb = np.full((n, manifest.embedding_dim), np.nan, np.float32)
    for e in cmu_events:
        if e.HasField("patches"):
            p = e.patches
            idx = np.asarray(p.patch_index)
            server_probs[idx] = np.asarray(p.probabilities, np.float32).reshape(-1, c)
            server_emb[idx] = np.asarray(p.embeddings, np.float32).reshape(-1, p.embedding_dim)
            np.testing.assert_allclose(np.asarray(p.x_l0), plan.grid.x_l0[idx])
            np.testing.assert_allclose(np.asarray(p.y_l0), plan.grid.y_l0[idx])
    local_probs = np.empty_like(server_probs)
    local_emb = np.empty_like(server_emb)
    for batch in PatchReader(real_slide, plan.grid, batch_size=16).iter_batches():
        out = served_runtime.predict_patches(batch.images)
        local_probs[batch.indices] = out.probabilities
        local_emb[batch.indices] = out.embeddings
    prob_diff = float(np.abs(server_probs - local_probs).max())
    print(f"patch probability max abs diff server vs in-process: {prob_diff:.3g}")
    assert prob_diff <= 1e-5
    slide = served_runtime.aggregate(local_emb)
    done = cmu_events[-1].completed
    slide_diff = float(
        np.abs(np.asarray(done.prediction.probabilities) - slide.probabilities).max()
    )
    attention = np.full(n, np.nan, np.float32)
    for e in cmu_events:
        if e.HasField("attention"):
            attention[np.asarray(e.attention.patch_index)] = e.attention.attention
    att_diff = float(np.abs(attention - slide.attention).max())
    print(f"slide probability diff {slide_diff:.3g}, attention diff {att_diff:.3g}")
    assert slide_diff <= 1e-5 and att_diff <= 1e-5
    assert abs(float(attention.sum()) - 1.0) < 1e-4


def test_error_sequence_server_keeps_serving(analysis_server) -> None:
    """bad, good, corrupt, traversal, good: each error has its status; the last succeeds."""
    target = analysis_server.target
    code, reason, message = error_of(target, "bad/not-a-tiff.svs")
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_UNSUPPORTED")
    assert "not-a-tiff" not in message and "/" not in message
    good = analyze(target, "real/tiny-16px.svs")
    assert good[-1].WhichOneof("event") == "completed"
    code, reason, message = error_of(target, "bad/corrupt-tile.svs")
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "SLIDE_CORRUPT"), message
    code, reason, _ = error_of(target, "../shared/slides/real/CMU-1-Small-Region.svs")
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_PATH_INVALID")
    events = analyze(target, CMU)
    assert events[-1].completed.outcome == pb.ANALYSIS_OUTCOME_COMPLETED


@pytest.mark.parametrize(
    ("path", "code", "reason"),
    [
        ("real/missing.svs", grpc.StatusCode.NOT_FOUND, "SLIDE_NOT_FOUND"),
        ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_PATH_INVALID"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_PATH_INVALID"),
        ("bad/unsupported-compression.tiff", grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_UNSUPPORTED"),
        ("real/" + "a" * 256, grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_PATH_INVALID"),
    ],
    ids=["missing", "absolute", "empty", "unsupported-compression", "name-too-long"],
)
def test_error_statuses(analysis_server, path: str, code, reason: str) -> None:
    got_code, got_reason, message = error_of(analysis_server.target, path)
    assert (got_code, got_reason) == (code, reason)
    assert str(analysis_server.slide_root) not in message
    # ExplainPatches validates the same way before admission.
    request = pb.ExplainPatchesRequest(slide_path=path)
    with pytest.raises(grpc.RpcError) as info:
        list(stub_for(analysis_server.target).ExplainPatches(request, timeout=60))
    assert info.value.code() == code, info.value.details()
    assert str(analysis_server.slide_root) not in info.value.details()


def test_server_log_has_request_ids_not_slide_names(analysis_server, cmu_events) -> None:
    log = analysis_server.log_text()
    assert "CMU-1" not in log and "not-a-tiff" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("request_id") for line in lines)


def test_tiny_slide_is_a_clear_result(analysis_server) -> None:
    events = analyze(analysis_server.target, "real/tiny-16px.svs")
    done = events[-1].completed
    assert done.outcome in (pb.ANALYSIS_OUTCOME_COMPLETED, pb.ANALYSIS_OUTCOME_NO_TISSUE)


def test_dicom_slide_is_analysed(analysis_server) -> None:
    events = analyze(analysis_server.target, "dicom-boxes/boxes_0.dcm")
    assert events[0].started.slide.vendor == "dicom"
    assert events[-1].WhichOneof("event") == "completed"


def test_health_reports_serving(analysis_server) -> None:
    with grpc.insecure_channel(analysis_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "histohelper.v1.SlideAnalysisService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(analysis_server) -> None:
    with grpc.insecure_channel(analysis_server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "histohelper.v1.SlideAnalysisService" in services
        assert "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("histohelper.v1.SlideAnalysisService")
        assert {m.name for m in service.methods} >= {"AnalyzeSlide", "GetModelInfo"}


def test_get_model_info(analysis_server) -> None:
    info = stub_for(analysis_server.target).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    manifest = json.loads(info.manifest_json)
    assert info.model.patch_classes == manifest["patch_classes"]
    assert info.model.untrained is True and info.model.precision == "fp32"


def test_classify_patches_matches_in_process(analysis_server, served_runtime) -> None:
    rng = np.random.default_rng(3)
    size = served_runtime.manifest.patch_size_px
    images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    request = pb.ClassifyPatchesRequest(
        images=[
            pb.PatchImage(
                id=f"p{i}", raw=pb.RawImage(width_px=size, height_px=size, rgb=im.tobytes())
            )
            for i, im in enumerate(images)
        ]
        + [pb.PatchImage(id="junk", encoded=b"not an image")],
        return_embeddings=True,
    )
    (reply,) = list(stub_for(analysis_server.target).ClassifyPatches(iter([request]), timeout=60))
    preds = {p.id: p for p in reply.predictions}
    assert preds["junk"].error and not preds["junk"].probabilities
    local = served_runtime.predict_patches(images)
    got = np.array([preds[f"p{i}"].probabilities for i in range(3)], np.float32)
    assert np.abs(got - local.probabilities).max() <= 1e-5


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (pb.AnalysisOptions(target_resolution=pb.Resolution(magnification=1e-9)), "magnif"),
        (pb.AnalysisOptions(target_resolution=pb.Resolution(mpp=5e-324)), "target mpp"),
        (pb.AnalysisOptions(mpp_override=1e-9), "mpp_override"),
        (pb.AnalysisOptions(mpp_override=6.786e306), "mpp_override"),
        (pb.AnalysisOptions(target_resolution=pb.Resolution(mpp=100.0)), "too coarse"),
        (
            pb.AnalysisOptions(target_resolution=pb.Resolution(mpp=0.01), mpp_override=100.0),
            "downsample",
        ),
    ],
    ids=[
        "tiny-magnification",
        "denormal-mpp",
        "tiny-mpp-override",
        "huge-mpp-override",
        "coarse-mpp",
        "upsampled-10000x",
    ],
)
def test_extreme_resolutions_are_invalid_options_not_internal(
    analysis_server, options, says
) -> None:
    request = pb.AnalyzeSlideRequest(slide_path=CMU, options=options)
    with pytest.raises(grpc.RpcError) as info:
        list(stub_for(analysis_server.target).AnalyzeSlide(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert says in info.value.details()


def test_slide_smaller_than_a_patch_says_so(analysis_server) -> None:
    events = analyze(analysis_server.target, "real/tiny-16px.svs")
    warnings = list(events[0].started.qc.warnings)
    assert any("smaller than one patch" in w for w in warnings), warnings
