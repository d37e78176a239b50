"""Hypothesis-driven garbage in every request field, and random bytes as uploads.

One in-process server (127.0.0.1, uploads on, tokens off so requests reach the deep
code) takes every example. Each call must end with a proper status: OK or a mapped
error. UNKNOWN (an exception gRPC did not expect) and INTERNAL (a server bug) fail
the test. The server must answer its health check with SERVING afterwards. The
statuses seen per RPC are printed at the end (``pytest -s``).

Limits keep examples fast: at most 64 patches per slide, 8 images per request.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hardening_support import insecure_stub, status_of, write_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histohelper.v1 import slide_analysis_pb2 as pb

EXAMPLES = 40
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CALL_TIMEOUT_S = 60
SEEN: dict[str, Counter[str]] = {}

KNOWN_PATHS = [
    "real/tiny-16px.svs",
    "real/CMU-1-Small-Region.svs",
    "bad/not-a-tiff.svs",
    "bad/corrupt-tile.svs",
    "bad/unsupported-compression.tiff",
    "dicom-boxes/boxes_0.dcm",
    "../real/tiny-16px.svs",
    "real/../../etc/passwd",
    "/etc/passwd",
    "C:\\Windows\\win.ini",
    "real\\tiny-16px.svs",
    "real",
    ".",
    "",
]

any_text = st.one_of(
    st.text(max_size=64),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300),
    st.sampled_from(["\x00", "a\x00b", "\u202e\u0000", "🧫" * 50, "x" * 5000]),
)
int32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, -1, 2, 7, 16, 224, 8192, 8193, 2**31 - 1, -(2**31)]),
)
doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.25, 0.5, 2.0, 40.0, math.nan, math.inf]),
)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def record(rpc: str, code: grpc.StatusCode, err: grpc.RpcError | None = None) -> None:
    """Count a status (with its ErrorInfo reason when there is one)."""
    name = code.name
    if err is not None:
        reason = status_of(err)[1]
        name = f"{name}/{reason}" if reason else name
    SEEN.setdefault(rpc, Counter())[name] += 1


def pick(draw, hostile: bool, plausible, garbage):
    """A plausible value, or (in a hostile example) sometimes garbage."""
    return draw(st.one_of(plausible, garbage) if hostile else plausible)


@st.composite
def resolutions(draw, hostile: bool) -> pb.Resolution | None:
    kind = draw(st.sampled_from(["none", "none", "mpp", "magnification", "level"]))
    if kind == "none":
        return None
    if kind == "level":
        return pb.Resolution(level=pick(draw, hostile, st.integers(0, 3), int32))
    plausible = st.floats(0.2, 40.0) if kind == "mpp" else st.floats(1.0, 40.0)
    return pb.Resolution(**{kind: pick(draw, hostile, plausible, doubles)})


@st.composite
def analysis_options(draw) -> pb.AnalysisOptions:
    """Two examples in three plausible (they reach tiling and the model), one hostile."""
    hostile = draw(st.sampled_from([False, False, True]))
    opts = pb.AnalysisOptions(
        patch_size_px=pick(draw, hostile, st.sampled_from([0, 64, 112, 224, 256, 512]), int32),
        stride_px=pick(draw, hostile, st.sampled_from([0, 0, 128, 224, 300]), int32),
        edge_mode=pick(draw, hostile, st.integers(0, 2), st.integers(-3, 6)),
        batch_size=pick(draw, hostile, st.sampled_from([0, 1, 7, 32]), int32),
        return_embeddings=draw(st.booleans()),
        return_attention=draw(st.booleans()),
        return_cams=draw(st.booleans()),
    )
    resolution = draw(resolutions(hostile))
    if resolution is not None:
        opts.target_resolution.CopyFrom(resolution)
    if draw(st.booleans()):
        opts.min_tissue_fraction = pick(draw, hostile, st.floats(0, 1, width=32), floats32)
    if draw(st.booleans()):
        opts.mpp_override = pick(draw, hostile, st.floats(0.2, 2.0), doubles)
    return opts


@st.composite
def analyze_requests(draw) -> pb.AnalyzeSlideRequest:
    request = pb.AnalyzeSlideRequest(
        options=draw(analysis_options()), request_id=draw(st.one_of(any_text, st.just("ok-1")))
    )
    source = draw(st.sampled_from(["path", "known", "known", "known", "known", "upload", "none"]))
    if source == "path":
        request.slide_path = draw(any_text)
    elif source == "known":
        cmu, tiny, dicom = KNOWN_PATHS[1], KNOWN_PATHS[0], KNOWN_PATHS[5]
        request.slide_path = draw(st.sampled_from([cmu] * 6 + [tiny, dicom] * 2 + KNOWN_PATHS))
    elif source == "upload":
        request.upload_id = draw(st.one_of(any_text, st.text("ab_-", min_size=32, max_size=32)))
    return request


def _png(h: int, w: int, channels: int) -> bytes:
    image = np.random.default_rng(h * 31 + w).integers(0, 255, (h, w, channels), np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


@st.composite
def patch_images(draw) -> pb.PatchImage:
    image = pb.PatchImage(id=draw(any_text))
    kind = draw(st.sampled_from(["random", "png", "raw", "raw-ok", "none"]))
    if kind == "random":
        image.encoded = draw(st.binary(max_size=4096))
    elif kind == "png":
        h, w = draw(st.integers(1, 300)), draw(st.integers(1, 300))
        image.encoded = _png(h, w, draw(st.sampled_from([1, 3, 4])))
    elif kind == "raw":
        image.raw.CopyFrom(
            pb.RawImage(
                width_px=draw(int32), height_px=draw(int32), rgb=draw(st.binary(max_size=512))
            )
        )
    elif kind == "raw-ok":
        h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        image.raw.CopyFrom(pb.RawImage(width_px=w, height_px=h, rgb=bytes(h * w * 3)))
    return image


@st.composite
def explain_requests(draw) -> pb.ExplainPatchesRequest:
    hostile = draw(st.sampled_from([False, False, True]))
    cmu = KNOWN_PATHS[1]
    request = pb.ExplainPatchesRequest(
        slide_path=pick(draw, hostile, st.sampled_from([cmu] * 4 + KNOWN_PATHS), any_text),
        options=draw(analysis_options()),
        class_name=pick(draw, hostile, st.sampled_from(["", "benign", "malignant"]), any_text),
        jpeg_quality=pick(draw, hostile, st.sampled_from([0, 1, 50, 100]), int32),
        request_id=draw(any_text),
    )
    which = draw(st.sampled_from(["top_k", "patches", "none"]))
    if which == "top_k":
        request.top_k.k = pick(draw, hostile, st.integers(1, 4), int32)
        request.top_k.rank_by = pick(draw, hostile, st.integers(0, 2), st.integers(-3, 9))
    elif which == "patches":
        index = pick(draw, hostile, st.integers(0, 70), int32)
        request.patches.patch_index.extend(draw(st.lists(st.just(index), max_size=6)))
    return request


@st.composite
def upload_streams(draw) -> list[pb.UploadSlideRequest]:
    """Random bytes as uploads: well-formed streams of garbage, and malformed streams."""
    data = draw(st.binary(min_size=0, max_size=50_000))
    well_formed = draw(st.booleans())
    suffixes = st.sampled_from([".svs", ".tiff", ".tif", ".dcm", ".ndpi", ".SVS"])
    suffix = draw(suffixes if well_formed else st.one_of(suffixes, any_text))
    md = pb.UploadSlideMetadata(
        size_bytes=len(data) if well_formed else draw(st.integers(-(2**63), 2**63 - 1)),
        sha256_hex=hashlib.sha256(data).hexdigest() if well_formed else draw(any_text),
        suffix=suffix,
    )
    step = draw(st.integers(1, 70_000))
    chunks = [pb.UploadSlideRequest(chunk=data[i : i + step]) for i in range(0, len(data), step)]
    stream = [pb.UploadSlideRequest(metadata=md), *chunks]
    if not well_formed and draw(st.booleans()):
        extra = draw(st.lists(st.one_of(st.binary(max_size=300), st.just(b"")), max_size=4))
        stream[draw(st.integers(0, len(stream))) :] = [
            pb.UploadSlideRequest(chunk=c) for c in extra
        ]
    return stream


@pytest.fixture(scope="module")
def fuzz_server(model_artifact, served_runtime, slides_dir, tmp_path_factory):
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    config = ServerConfig(
        model_path=model_artifact,
        slide_root=slides_dir,
        port=0,
        precision="fp32",
        max_patches_per_slide=64,
        max_images_per_request=8,
        max_concurrent_analyses=2,
        upload_dir=tmp_path_factory.mktemp("fuzz-uploads"),
        upload_max_bytes=40_000,
        upload_quota_bytes=400_000,
        default_deadline_s=30,
    )
    running = start_server(config, runtime=served_runtime)
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def stub(fuzz_server):
    return insecure_stub(fuzz_server.target)


def analyze_status(stub, request: pb.AnalyzeSlideRequest, rpc: str) -> grpc.StatusCode:
    try:
        events = list(stub.AnalyzeSlide(request, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as err:
        record(rpc, err.code(), err)
        return err.code()
    assert events and events[-1].WhichOneof("event") == "completed"
    record(rpc, grpc.StatusCode.OK)
    return grpc.StatusCode.OK


@settings(SETTINGS, max_examples=60)
@given(request=analyze_requests())
def test_fuzz_analyze_slide(stub, request: pb.AnalyzeSlideRequest) -> None:
    code = analyze_status(stub, request, "AnalyzeSlide")
    assert code not in FORBIDDEN, request


@SETTINGS
@given(
    requests=st.lists(
        st.builds(
            pb.ClassifyPatchesRequest,
            images=st.lists(patch_images(), max_size=10),
            return_embeddings=st.booleans(),
        ),
        min_size=0,
        max_size=3,
    )
)
def test_fuzz_classify_patches(stub, requests: list[pb.ClassifyPatchesRequest]) -> None:
    try:
        replies = list(stub.ClassifyPatches(iter(requests), timeout=CALL_TIMEOUT_S))
        code = grpc.StatusCode.OK
        assert len(replies) == len(requests)
        for request, reply in zip(requests, replies, strict=True):
            assert len(reply.predictions) == len(request.images)
            for p in reply.predictions:
                assert bool(p.error) != bool(p.probabilities)
        record("ClassifyPatches", code)
    except grpc.RpcError as err:
        code = err.code()
        record("ClassifyPatches", code, err)
    assert code not in FORBIDDEN


@SETTINGS
@given(request=explain_requests())
def test_fuzz_explain_patches(stub, request: pb.ExplainPatchesRequest) -> None:
    try:
        list(stub.ExplainPatches(request, timeout=CALL_TIMEOUT_S))
        code = grpc.StatusCode.OK
        record("ExplainPatches", code)
    except grpc.RpcError as err:
        code = err.code()
        record("ExplainPatches", code, err)
    assert code not in FORBIDDEN, request


@SETTINGS
@given(stream=upload_streams(), options=analysis_options())
def test_fuzz_uploads_of_random_bytes(
    stub, fuzz_server, stream: list[pb.UploadSlideRequest], options
) -> None:
    try:
        reply = stub.UploadSlide(iter(stream), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        record("UploadSlide", err.code(), err)
        assert err.code() not in FORBIDDEN
        return
    record("UploadSlide", grpc.StatusCode.OK)
    # Random bytes stored as a "slide": analysing them must fail cleanly.
    request = pb.AnalyzeSlideRequest(upload_id=reply.upload_id, options=options)
    code = analyze_status(stub, request, "AnalyzeSlide(upload)")
    assert code not in FORBIDDEN
    assert not any(p.name.endswith(".part") for p in fuzz_server.uploads.root.rglob("*"))


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    header=st.one_of(
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
        st.builds(
            lambda t: f"Bearer {t}",
            st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=100),
        ),
    )
)
def test_fuzz_authorization_headers(token_stub, header: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        token_stub.GetModelInfo(
            pb.GetModelInfoRequest(), metadata=(("authorization", header),), timeout=10
        )
    record("auth header", info.value.code(), info.value)
    assert status_of(info.value) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


@pytest.fixture(scope="module")
def token_stub(model_artifact, served_runtime, slides_dir, tmp_path_factory):
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    tokens = write_tokens(
        tmp_path_factory.mktemp("fuzz-tokens") / "t.json", {"real-token-" + "7" * 40: ("x", [])}
    )
    running = start_server(
        ServerConfig(model_path=model_artifact, slide_root=slides_dir, port=0, tokens_file=tokens),
        runtime=served_runtime,
    )
    yield insecure_stub(running.target)
    running.stop(grace=0)


def test_server_healthy_after_fuzzing(fuzz_server) -> None:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="histohelper.v1.SlideAnalysisService"),
            timeout=10,
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert fuzz_server.servicer.wait_idle(timeout=30)
    assert not any(p.name.endswith(".part") for p in fuzz_server.uploads.root.rglob("*"))
    events = list(
        insecure_stub(fuzz_server.target).AnalyzeSlide(
            pb.AnalyzeSlideRequest(slide_path="real/tiny-16px.svs"), timeout=60
        )
    )
    assert events[-1].WhichOneof("event") == "completed"
    print("\nfuzz statuses per RPC:")
    for rpc, counts in sorted(SEEN.items()):
        print(f"  {rpc:22s} {sum(counts.values()):4d} calls  {dict(sorted(counts.items()))}")
