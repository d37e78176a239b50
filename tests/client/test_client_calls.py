"""SlideClient / AsyncSlideClient over a real gRPC server on 127.0.0.1:0 (scripted servicer)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from client_fakes import PlainStatus, ScriptedServer, StreamSpec, build_stream, status_for

from histohelper.client import (
    AnalysisOptions,
    AsyncSlideClient,
    Completed,
    PatchBatch,
    Progress,
    RetryPolicy,
    SlideClient,
    Started,
)
from histohelper.errors import (
    HistoHelperError,
    InternalError,
    ServerUnavailableError,
    error_table,
)

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
ERRORS = sorted(error_table().items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_analyze_returns_result_and_reports_progress(scripted: ScriptedServer) -> None:
    msgs, exp = build_stream(StreamSpec())
    scripted.script.messages = msgs
    seen: list[Progress] = []
    with SlideClient(scripted.target, retry=FAST_RETRY) as client:
        result = client.analyze(
            "real/slide.svs", AnalysisOptions(target_mpp=0.5), on_progress=seen.append
        )
    assert result.patch_count == len(exp.patch_index)
    assert result.request_id == "req-1"
    assert seen[0].patches_done == 0 and seen[0].patches_total == result.grid.patch_count
    assert seen[-1].patches_done == seen[-1].patches_total
    req = scripted.script.requests[0]
    assert req.slide_path == "real/slide.svs"
    assert req.options.target_resolution.mpp == 0.5 and req.options.return_attention


def test_stream_yields_typed_events_in_order(scripted: ScriptedServer) -> None:
    scripted.script.messages, _ = build_stream(StreamSpec())
    with SlideClient(scripted.target) as client:
        events = list(client.stream("a.svs"))
    assert isinstance(events[0], Started) and isinstance(events[-1], Completed)
    assert any(isinstance(e, PatchBatch) for e in events)


def test_closing_the_stream_early_cancels_the_call(scripted: ScriptedServer) -> None:
    scripted.script.messages, _ = build_stream(StreamSpec())
    scripted.script.block_after = 2
    with SlideClient(scripted.target) as client:
        it = client.stream("a.svs")
        assert isinstance(next(it), Started)
        it.close()
        assert scripted.script.cancelled.wait(5)


def test_token_is_sent_as_bearer_metadata(scripted: ScriptedServer) -> None:
    with SlideClient(scripted.target, token="s3cret") as client:
        client.get_model_info()
    assert scripted.script.received_metadata[0]["authorization"] == "Bearer s3cret"


def test_model_info(scripted: ScriptedServer) -> None:
    with SlideClient(scripted.target) as client:
        info = client.get_model_info()
    assert info.model.patch_classes == ("tumor", "stroma", "other")
    assert info.manifest["format"] == "histohelper-model"
    assert info.default_batch_size == 32


def test_retries_unavailable_with_backoff(scripted: ScriptedServer) -> None:
    scripted.script.unavailable_first = 2
    scripted.script.messages, _ = build_stream(StreamSpec())
    with SlideClient(scripted.target, retry=FAST_RETRY) as client:
        assert client.get_model_info().model.name == "fake-model"
        assert scripted.script.calls == 3
        scripted.script.unavailable_first = 1
        assert client.analyze("a.svs").outcome == "completed"
        assert scripted.script.calls == 5


def test_no_retry_when_disabled(scripted: ScriptedServer) -> None:
    scripted.script.unavailable_first = 1
    with (
        SlideClient(scripted.target, retry=None) as client,
        pytest.raises(ServerUnavailableError, match="warming up"),
    ):
        client.get_model_info()


def test_unreachable_server_is_server_unavailable() -> None:
    target = f"127.0.0.1:{free_port()}"
    with (
        SlideClient(target, retry=FAST_RETRY, timeout=10) as client,
        pytest.raises(ServerUnavailableError) as info,
    ):
        client.get_model_info()
    assert str(info.value).startswith("server unavailable")


@pytest.mark.parametrize(("reason", "cls"), ERRORS, ids=[r for r, _ in ERRORS])
def test_every_error_maps_back_to_its_class(
    scripted: ScriptedServer, reason: str, cls: type[HistoHelperError]
) -> None:
    scripted.script.messages, _ = build_stream(StreamSpec())
    scripted.script.abort_with = status_for(cls("the slide failed"))
    scripted.script.abort_after = 0 if reason != "INTERNAL" else 3  # also mid-stream
    with SlideClient(scripted.target, retry=None) as client, pytest.raises(cls) as info:
        client.analyze("a.svs")
    err = info.value
    assert type(err) is cls
    assert err.message == "the slide failed"
    assert err.metadata["request_id"] == "req-err"
    assert isinstance(err.__cause__, grpc.RpcError)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, "SlideNotFoundError"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "ServerBusyError"),
        (grpc.StatusCode.UNKNOWN, "HistoHelperError"),
    ],
    ids=["not-found", "exhausted", "unknown"],
)
def test_status_without_error_info_maps_by_code(
    scripted: ScriptedServer, code: grpc.StatusCode, expected: str
) -> None:
    scripted.script.abort_with = PlainStatus(code, "plain failure")
    with (
        SlideClient(scripted.target, retry=None) as client,
        pytest.raises(HistoHelperError) as info,
    ):
        client.get_model_info()
    assert type(info.value).__name__ == expected
    assert "plain failure" in str(info.value)


def test_stream_ending_early_is_internal_error(scripted: ScriptedServer) -> None:
    msgs, _ = build_stream(StreamSpec())
    scripted.script.messages = msgs[:-1]
    with SlideClient(scripted.target) as client, pytest.raises(InternalError, match="ended before"):
        client.analyze("a.svs")


def test_async_client_same_methods(scripted: ScriptedServer) -> None:
    msgs, exp = build_stream(StreamSpec())
    scripted.script.messages = msgs

    async def main():
        progress = []

        async def on_progress(p):
            progress.append(p)

        async with AsyncSlideClient(scripted.target, retry=FAST_RETRY, token="t") as client:
            info = await client.get_model_info()
            result = await client.analyze("a.svs", on_progress=on_progress)
            events = [e async for e in client.stream("a.svs")]
        return info, result, events, progress

    info, result, events, progress = asyncio.run(main())
    assert info.model.name == "fake-model"
    assert result.patch_count == len(exp.patch_index)
    assert isinstance(events[0], Started) and isinstance(events[-1], Completed)
    assert progress[-1].patches_done == progress[-1].patches_total
    assert scripted.script.received_metadata[0]["authorization"] == "Bearer t"


def test_async_client_maps_errors(scripted: ScriptedServer) -> None:
    from histohelper.errors import SlideNotFoundError

    scripted.script.abort_with = status_for(SlideNotFoundError("the slide does not exist"))

    async def main():
        async with AsyncSlideClient(scripted.target, retry=None) as client:
            await client.analyze("missing.svs")

    with pytest.raises(SlideNotFoundError, match="does not exist") as info:
        asyncio.run(main())
    assert info.value.metadata["request_id"] == "req-err"


def test_channel_options_carry_retry_policy_and_message_limit() -> None:
    import json

    from histohelper.client._channel import channel_options

    opts = dict(channel_options(RetryPolicy(), 64 << 20))
    assert opts["grpc.max_receive_message_length"] == 64 << 20
    cfg = json.loads(opts["grpc.service_config"])
    policy = cfg["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    names = cfg["methodConfig"][0]["name"]
    assert {n["service"] for n in names} == {"histohelper.v1.SlideAnalysisService"}
    # Idempotent calls only: a retried upload would store the slide twice.
    assert sorted(n["method"] for n in names) == [
        "AnalyzeSlide",
        "ClassifyPatches",
        "ExplainPatches",
        "GetModelInfo",
    ]
    assert "loadBalancingConfig" not in cfg  # one host:port keeps pick_first


def test_tls_requires_consistent_arguments() -> None:
    with pytest.raises(ValueError, match="tls=False"):
        SlideClient("127.0.0.1:1", tls=False, root_certificates=b"x")
