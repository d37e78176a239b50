"""The one call path on a real server: undecodable requests, half-open and non-reading
clients, client deadlines in the audit log, and the RPC table covering the service."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hardening_support import insecure_stub, read_audit, status_of

from histohelper.v1 import slide_analysis_pb2 as pb

SERVICE = "/histohelper.v1.SlideAnalysisService/"
CMU = "real/CMU-1-Small-Region.svs"
TINY = "real/tiny-16px.svs"
#: Bytes no protobuf message parses: field 0 is invalid, then a truncated varint.
GARBAGE = b"\x00\xff\xff\xff"
#: A client whose HTTP/2 window never grows (no BDP probing): a stream it does not read
#: fills within about 100 KB, so the server's writes stop at once.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]


def raw(channel: grpc.Channel, method: str, kind: str):
    """A multicallable that sends and receives raw bytes (no serialisation)."""
    return getattr(channel, kind)(SERVICE + method)


def slow_request(**options: object) -> pb.AnalyzeSlideRequest:
    """CMU in batches of one patch with 4x overlap: hundreds of model calls."""
    return pb.AnalyzeSlideRequest(
        slide_path=CMU, options=pb.AnalysisOptions(batch_size=1, stride_px=56, **options)
    )


@pytest.mark.parametrize(
    ("method", "kind", "payload"),
    [
        ("GetModelInfo", "unary_unary", GARBAGE),
        ("AnalyzeSlide", "unary_stream", GARBAGE),
        ("ExplainPatches", "unary_stream", GARBAGE),
        ("ClassifyPatches", "stream_stream", iter([GARBAGE])),
        ("UploadSlide", "stream_unary", iter([GARBAGE])),
    ],
    ids=["unary", "server-stream", "explain", "bidi", "client-stream"],
)
def test_undecodable_requests_are_invalid_argument_and_audited(
    start_inprocess_server, tmp_path, method: str, kind: str, payload
) -> None:
    """grpcio answered undecodable bytes with INTERNAL ("Exception deserializing
    request") and left no audit record for unary calls."""
    audit_path = tmp_path / "audit.jsonl"
    running = start_inprocess_server(audit_log=audit_path)
    with grpc.insecure_channel(running.target) as channel:
        call = raw(channel, method, kind)
        with pytest.raises(grpc.RpcError) as info:
            result = call(payload, timeout=30)
            if kind.endswith("_stream"):
                list(result)
        assert status_of(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
        # The server carries on.
        assert insecure_stub(running.target).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    running.stop(grace=0)
    records = read_audit(audit_path)
    assert [(r["rpc"], r["outcome"], r["reason"]) for r in records] == [
        (method, "INVALID_ARGUMENT", "MALFORMED_REQUEST"),
        ("GetModelInfo", "OK", None),
    ]


def test_half_open_calls_hold_no_thread(start_inprocess_server) -> None:
    """Calls whose client never finishes its request hold no server thread: with the
    sync server, about 20 of them took every thread of the pool and health checks on
    the main port timed out."""
    running = start_inprocess_server()
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(60)
        return
        yield b""  # never reached

    with grpc.insecure_channel(running.target) as channel:
        calls = [
            channel.stream_unary(SERVICE + method).future(never(), timeout=60)
            for method in ("GetModelInfo", "AnalyzeSlide") * 50
        ]
        calls += [
            channel.stream_stream(SERVICE + "ClassifyPatches")(never(), timeout=60)
            for _ in range(3)
        ]
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        info = insecure_stub(running.target).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.model.patch_classes
        events = list(
            insecure_stub(running.target).AnalyzeSlide(
                pb.AnalyzeSlideRequest(slide_path=TINY), timeout=60
            )
        )
        assert events[-1].WhichOneof("event") == "completed"
        assert not any(c.done() for c in calls)
        release.set()
        for call in calls:
            call.cancel()


def test_non_reading_streams_free_their_slots(start_inprocess_server, tmp_path) -> None:
    """Two clients that open AnalyzeSlide and never read held both analysis slots until
    the default deadline (3,600 s): everyone else got SERVER_BUSY."""
    audit_path = tmp_path / "audit.jsonl"
    running = start_inprocess_server(
        max_concurrent_analyses=2, stalled_stream_s=2.0, audit_log=audit_path
    )
    silent = grpc.insecure_channel(running.target, options=SMALL_WINDOW)
    request = slow_request(return_embeddings=True).SerializeToString()
    stalled = [raw(silent, "AnalyzeSlide", "unary_stream")(request) for _ in range(2)]
    # Both slots are taken: a third analysis is refused at once...
    deadline = time.monotonic() + 30
    while running.servicer.active_analyses < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as busy:
        list(insecure_stub(running.target).AnalyzeSlide(slow_request(), timeout=30))
    assert status_of(busy.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY")
    # ...until the stall limit frees both slots; the silent client did nothing.
    assert running.servicer.wait_idle(timeout=60), "non-reading streams kept their slots"
    events = list(
        insecure_stub(running.target).AnalyzeSlide(
            pb.AnalyzeSlideRequest(slide_path=TINY), timeout=60
        )
    )
    assert events[-1].WhichOneof("event") == "completed"
    running.stop(grace=0)
    reasons = [(r["rpc"], r["outcome"], r["reason"]) for r in read_audit(audit_path)]
    assert sorted(reasons[:3]) == [
        ("AnalyzeSlide", "DEADLINE_EXCEEDED", "STREAM_STALLED"),
        ("AnalyzeSlide", "DEADLINE_EXCEEDED", "STREAM_STALLED"),
        ("AnalyzeSlide", "RESOURCE_EXHAUSTED", "SERVER_BUSY"),
    ]
    assert reasons[3:] == [("AnalyzeSlide", "OK", None)]
    for call in stalled:
        call.cancel()
    silent.close()


def test_client_deadline_and_cancel_are_audited_as_the_client_saw_them(
    start_inprocess_server, tmp_path
) -> None:
    """Streams that hit the client's deadline were audited CANCELLED."""
    audit_path = tmp_path / "audit.jsonl"
    running = start_inprocess_server(audit_log=audit_path)
    stub = insecure_stub(running.target)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnalyzeSlide(slow_request(), timeout=2.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = stub.AnalyzeSlide(slow_request(), timeout=60)
    next(call)
    call.cancel()
    assert running.servicer.wait_idle(timeout=30)
    running.stop(grace=0)
    outcomes = [(r["rpc"], r["outcome"]) for r in read_audit(audit_path)]
    assert outcomes == [("AnalyzeSlide", "DEADLINE_EXCEEDED"), ("AnalyzeSlide", "CANCELLED")]


def test_every_rpc_of_the_service_is_on_the_call_path(start_inprocess_server) -> None:
    """The servicer's table names exactly the proto's methods, and the service builder
    refuses a table that misses one (no RPC can bypass the call path)."""
    from histohelper.server.callpath import build_service

    running = start_inprocess_server()
    service = pb.DESCRIPTOR.services_by_name["SlideAnalysisService"]
    table = running.servicer.rpcs()
    assert set(table) == {m.name for m in service.methods}
    partial = dict(table)
    partial.pop("GetModelInfo")
    with pytest.raises(ValueError, match="GetModelInfo"):
        build_service(service, None, partial)  # type: ignore[arg-type]


def test_sigterm_stops_within_grace_after_an_undecodable_classify_message(
    model_artifact, slides_dir, tmp_path
) -> None:
    """After one undecodable ClassifyPatches message the sync server ignored SIGTERM
    (still running 60 s later: the handler swallowed the stream's RpcError)."""
    import signal

    from server_fixtures import spawn_server

    server = spawn_server(model_artifact, slides_dir, tmp_path, "--grace-s", "2")
    release = threading.Event()

    def garbage_then_silence() -> Iterator[bytes]:
        yield GARBAGE
        release.wait(60)

    with grpc.insecure_channel(server.target) as channel:
        call = raw(channel, "ClassifyPatches", "stream_stream")(garbage_then_silence(), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert status_of(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
        # A second stream stays open while the server is asked to stop.
        idle = raw(channel, "ClassifyPatches", "stream_stream")(garbage_then_silence(), timeout=60)
        t0 = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=30)
        stopped_s = time.monotonic() - t0
        release.set()
        idle.cancel()
    assert code == 0, server.log_text()[-2000:]
    print(f"stopped {stopped_s:.2f} s after SIGTERM (grace 2 s)")


def test_stop_with_a_call_in_flight_audits_it_and_frees_its_slot(
    start_inprocess_server, tmp_path
) -> None:
    """The loop used to close while a cancelled call still cleaned up: no audit record,
    and its slot was never given back (found by review)."""
    audit_path = tmp_path / "audit.jsonl"
    running = start_inprocess_server(audit_log=audit_path)
    call = insecure_stub(running.target).AnalyzeSlide(slow_request(), timeout=120)
    next(call)  # the analysis is running
    running.stop(grace=0, drain=0)
    assert running.servicer.wait_idle(timeout=0)
    assert [(r["rpc"], r["outcome"]) for r in read_audit(audit_path)] == [
        ("AnalyzeSlide", "CANCELLED")
    ]


def test_undecodable_request_is_refused_before_admission(start_inprocess_server) -> None:
    """With every slot taken, undecodable bytes got SERVER_BUSY (found by review)."""
    running = start_inprocess_server(max_concurrent_analyses=1)
    call = insecure_stub(running.target).AnalyzeSlide(slow_request(), timeout=120)
    next(call)
    with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError) as info:
        list(raw(channel, "AnalyzeSlide", "unary_stream")(GARBAGE, timeout=30))
    assert status_of(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    call.cancel()


@pytest.mark.parametrize(
    "given", ["abc\n", "a b", "x" * 65, "ü"], ids=["newline", "space", "long", "utf8"]
)
def test_request_ids_out_of_pattern_are_replaced(start_inprocess_server, given: str) -> None:
    """A request id is echoed into logs, audit and errors only when it matches the
    pattern in full (a trailing newline passed ``re.match`` with ``$``)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    running = start_inprocess_server()
    request = pb.AnalyzeSlideRequest(slide_path="real/no-such-slide.svs", request_id=given)
    with pytest.raises(grpc.RpcError) as info:
        list(insecure_stub(running.target).AnalyzeSlide(request, timeout=30))
    detail = error_details_pb2.ErrorInfo()
    rpc_status.from_call(info.value).details[0].Unpack(detail)
    assert detail.reason == "SLIDE_NOT_FOUND"
    assert detail.metadata["request_id"] != given
    assert len(detail.metadata["request_id"]) == 16
