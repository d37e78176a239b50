"""Explicit limits (default deadline, images per request, message size, keepalive) and
the audit log, on real in-process servers."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from hardening_support import CMU, TINY, insecure_stub, read_audit, status_of, write_tokens

from histohelper.client import AnalysisOptions, SlideClient
from histohelper.server.audit import slide_fingerprint
from histohelper.v1 import slide_analysis_pb2 as pb

MIB = 1024 * 1024


def slow_request() -> pb.AnalyzeSlideRequest:
    """CMU in batches of one patch with 4x overlap: far longer than a second."""
    return pb.AnalyzeSlideRequest(
        slide_path=CMU, options=pb.AnalysisOptions(batch_size=1, stride_px=56)
    )


def test_default_deadline_stops_analyses_without_one(start_inprocess_server, tmp_path) -> None:
    audit_path = tmp_path / "audit.jsonl"
    running = start_inprocess_server(
        default_deadline_s=1.5, max_concurrent_analyses=1, audit_log=audit_path
    )
    stub = insecure_stub(running.target)
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnalyzeSlide(slow_request()))  # the client sets no deadline
    elapsed = time.perf_counter() - t0
    assert status_of(info.value) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
    assert "default deadline" in info.value.details()
    assert 1.4 < elapsed < 30, elapsed
    assert running.servicer.wait_idle(timeout=30)
    # A client deadline takes precedence over the server's default.
    events = list(stub.AnalyzeSlide(pb.AnalyzeSlideRequest(slide_path=TINY), timeout=60))
    assert events[-1].WhichOneof("event") == "completed"
    outcomes = [(e["rpc"], e["outcome"]) for e in read_audit(audit_path)]
    assert outcomes == [("AnalyzeSlide", "DEADLINE_EXCEEDED"), ("AnalyzeSlide", "OK")]


def test_the_tiler_refuses_with_the_servers_patch_limit(start_inprocess_server) -> None:
    """--max-patches reaches the tiler, which stops counting there (the tiler's own
    default of 2,000,000 would refuse first, and name itself, above that)."""
    running = start_inprocess_server(max_patches_per_slide=100)
    stub = insecure_stub(running.target)
    req = pb.AnalyzeSlideRequest(slide_path=CMU, options=pb.AnalysisOptions(stride_px=32))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnalyzeSlide(req, timeout=60))
    assert status_of(info.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SLIDE_TOO_LARGE")
    assert "more than 100 patches would be kept" in info.value.details()


def test_images_per_request_and_message_size_limits(start_inprocess_server) -> None:
    running = start_inprocess_server(max_images_per_request=4, max_message_bytes=1 * MIB)
    stub = insecure_stub(running.target)
    png = cv2.imencode(".png", np.full((32, 32, 3), 200, np.uint8))[1].tobytes()
    images = [pb.PatchImage(id=str(i), encoded=png) for i in range(5)]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ClassifyPatches(iter([pb.ClassifyPatchesRequest(images=images)]), timeout=30))
    assert status_of(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OPTIONS")
    ok = list(
        stub.ClassifyPatches(iter([pb.ClassifyPatchesRequest(images=images[:4])]), timeout=60)
    )
    assert len(ok[0].predictions) == 4
    huge = pb.PatchImage(id="huge", encoded=bytes(2 * MIB))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ClassifyPatches(iter([pb.ClassifyPatchesRequest(images=[huge])]), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_options_follow_the_configuration() -> None:
    from histohelper.server.app import grpc_options
    from histohelper.server.config import ServerConfig

    config = ServerConfig(
        model_path=Path("m.pt"),
        slide_root=Path("."),
        max_message_bytes=8 * MIB,
        keepalive_time_s=30,
        keepalive_timeout_s=5,
    )
    options = dict(grpc_options(config))
    assert options["grpc.max_receive_message_length"] == 8 * MIB
    assert options["grpc.max_send_message_length"] == 8 * MIB
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.so_reuseport"] == 0
    # Minutes, not hours: clients re-resolve DNS and find new replicas (issue 19); the
    # grace is separate, so long analyses are not cut off with their connection.
    assert 60_000 <= options["grpc.max_connection_age_ms"] <= 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 3_600_000
    aged = dict(
        grpc_options(replace(config, max_connection_age_s=2, max_connection_age_grace_s=0.5))
    )
    assert aged["grpc.max_connection_age_ms"] == 2_000
    assert aged["grpc.max_connection_age_grace_ms"] == 500
    never = dict(grpc_options(replace(config, max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in never


def test_a_port_in_use_is_refused(start_inprocess_server) -> None:
    """gRPC's SO_REUSEPORT default let a second server share a port in use."""
    from histohelper.server.app import PortBindError

    first = start_inprocess_server()
    with pytest.raises(PortBindError, match="could not bind"):
        start_inprocess_server(port=first.port)
    with pytest.raises(PortBindError, match="health port"):
        start_inprocess_server(health_port=first.port)
    assert insecure_stub(first.target).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model.name


@pytest.mark.parametrize(
    "bad",
    [
        {"tls_cert": Path("c.pem")},
        {"tls_client_ca": Path("ca.pem")},
        {"upload_max_bytes": 10, "upload_quota_bytes": 5},
        {"default_deadline_s": -1},
        {"max_images_per_request": 0},
        {"keepalive_time_s": 0},
    ],
    ids=["cert-without-key", "client-ca-without-tls", "cap-over-quota", "deadline", "images", "ka"],
)
def test_config_rejects_inconsistent_limits(bad: dict) -> None:
    from histohelper.server.config import ServerConfig

    with pytest.raises(ValueError):
        ServerConfig(model_path=Path("m.pt"), slide_root=Path("."), **bad)


def test_audit_log_records_every_call(start_inprocess_server, tmp_path, real_slide, caplog) -> None:
    token = "audit-token-" + "9" * 40
    tokens = write_tokens(tmp_path / "tokens.json", {token: ("lis-audit", ["analyze", "upload"])})
    audit_path = tmp_path / "audit.jsonl"
    caplog.set_level(logging.INFO)
    running = start_inprocess_server(
        tokens_file=tokens, audit_log=audit_path, upload_dir=tmp_path / "up"
    )
    with SlideClient(running.target, token=token, retry=None, timeout=120) as client:
        client.analyze(TINY, AnalysisOptions(), request_id="req-good-1")
        uploaded = client.upload(real_slide)
        client.analyze(uploaded, AnalysisOptions(return_attention=False), request_id="req-up-2")
        with pytest.raises(Exception):  # noqa: B017 - any mapped error
            client.analyze("bad/not-a-tiff.svs", request_id="req-bad-3")
        client.get_model_info()
    with SlideClient(running.target, retry=None, timeout=30) as anonymous, pytest.raises(Exception):  # noqa: B017
        anonymous.analyze(TINY)
    # A cancelled analysis is recorded once the call ends.
    call = insecure_stub(running.target).AnalyzeSlide(
        slow_request(), metadata=(("authorization", f"Bearer {token}"),), timeout=60
    )
    next(iter(call))
    call.cancel()
    end = time.monotonic() + 60  # a ceiling for a loaded machine
    while len(read_audit(audit_path)) < 7 and time.monotonic() < end:
        time.sleep(0.05)
    entries = read_audit(audit_path)
    by_id = {e["request_id"]: e for e in entries}
    good, up, bad = by_id["req-good-1"], by_id["req-up-2"], by_id["req-bad-3"]
    tiny_print = slide_fingerprint(Path(running.config.slide_root) / TINY)
    assert good["outcome"] == "OK" and good["caller"] == "lis-audit"
    assert good["slide_fingerprint"] == tiny_print and good["model_version"]
    assert good["duration_s"] > 0 and good["reason"] is None and good["peer"]
    assert up["slide_fingerprint"] == f"sha256:{uploaded.sha256_hex}"
    assert (bad["outcome"], bad["reason"]) == ("INVALID_ARGUMENT", "SLIDE_UNSUPPORTED")
    rpcs = [e["rpc"] for e in entries]
    assert rpcs.count("UploadSlide") == 1 and rpcs.count("GetModelInfo") == 1
    upload = next(e for e in entries if e["rpc"] == "UploadSlide")
    assert upload["slide_fingerprint"] == f"sha256:{uploaded.sha256_hex}"
    assert any(e["outcome"] == "UNAUTHENTICATED" for e in entries)
    assert entries[-1]["outcome"] == "CANCELLED" and entries[-1]["rpc"] == "AnalyzeSlide"
    keys = {
        "time", "rpc", "request_id", "caller", "client_cert", "peer", "model_version",
        "slide_fingerprint", "outcome", "reason", "duration_s",
    }  # fmt: skip
    assert all(set(e) == keys for e in entries)
    text = audit_path.read_text() + caplog.text
    for secret in ("tiny-16px", "not-a-tiff", "CMU-1", str(running.config.slide_root), token):
        assert secret not in text
    assert (audit_path.stat().st_mode & 0o777) == 0o600


def test_audit_without_a_file_goes_to_the_audit_logger(start_inprocess_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="histohelper.audit")
    running = start_inprocess_server()
    with SlideClient(running.target, timeout=30) as client:
        client.get_model_info()
    records = [r for r in caplog.records if r.name == "histohelper.audit"]
    assert records and records[-1].audit["rpc"] == "GetModelInfo"  # type: ignore[attr-defined]
    assert json.dumps(records[-1].audit)  # type: ignore[attr-defined]
