"""UploadSlide: round trip, size cap, checksum, interruption, quota, expiry, ownership.

Servers run in-process on 127.0.0.1 with their upload area under ``tmp_path`` so the
tests can see that nothing is left behind.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hardening_support import (
    CMU,
    TINY,
    insecure_stub,
    own_files,
    status_of,
    upload_files,
    write_tokens,
)

from histohelper.client import AnalysisOptions, SlideClient, UploadedSlide
from histohelper.errors import (
    SlideNotFoundError,
    SlidePathError,
    SlideTooLargeError,
    UploadChecksumError,
    UploadError,
    UploadQuotaError,
)
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

MIB = 1024 * 1024


def wait_for(predicate, timeout: float = 60.0) -> bool:
    """Poll ``predicate`` (filesystem state has no event to wait on) until true or timeout
    (a ceiling for a loaded machine; a true predicate returns at once)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def metadata(data: bytes, suffix: str = ".svs", size: int | None = None, sha: str | None = None):
    return pb.UploadSlideRequest(
        metadata=pb.UploadSlideMetadata(
            size_bytes=len(data) if size is None else size,
            sha256_hex=hashlib.sha256(data).hexdigest() if sha is None else sha,
            suffix=suffix,
        )
    )


def chunks(data: bytes, step: int = MIB) -> list[pb.UploadSlideRequest]:
    return [pb.UploadSlideRequest(chunk=data[i : i + step]) for i in range(0, len(data), step)]


def upload_error(target: str, requests: list[pb.UploadSlideRequest]) -> tuple:
    with pytest.raises(grpc.RpcError) as info:
        insecure_stub(target).UploadSlide(iter(requests), timeout=30)
    return status_of(info.value)


@pytest.fixture
def upload_server(start_inprocess_server, tmp_path: Path):
    def start(**overrides):
        area = tmp_path / "uploads"
        return start_inprocess_server(upload_dir=area, **overrides), area

    return start


def test_upload_then_analyze_matches_the_path_analysis(upload_server, real_slide: Path) -> None:
    running, area = upload_server()
    options = AnalysisOptions(return_attention=True)
    with SlideClient(running.target, timeout=300) as client:
        uploaded = client.upload(real_slide)  # 1.9 MB: two chunks
        assert uploaded.size_bytes == real_slide.stat().st_size
        assert uploaded.sha256_hex == hashlib.sha256(real_slide.read_bytes()).hexdigest()
        assert real_slide.name not in uploaded.upload_id and len(uploaded.upload_id) == 32
        by_upload = client.analyze(uploaded, options)
        by_path = client.analyze(CMU, options)
        again = client.analyze(UploadedSlide(uploaded.upload_id), options)  # reusable
        explained = client.explain(uploaded, patch_indices=[0, 1])
        explained_by_path = client.explain(CMU, patch_indices=[0, 1])
    assert by_upload.outcome == "completed"
    np.testing.assert_allclose(
        by_upload.prediction.probabilities, by_path.prediction.probabilities, atol=1e-6
    )
    assert again.prediction.predicted_class == by_path.prediction.predicted_class
    for a, b in zip(explained, explained_by_path, strict=True):
        assert a.patch_index == b.patch_index
        np.testing.assert_allclose(a.grad_cam, b.grad_cam, atol=1e-6)
    # Each upload alone in its own 0700 directory (OpenSlide's DICOM driver reads the
    # other files of a series beside the one it opens), with its record for the other
    # servers sharing the area.
    folder = area / uploaded.upload_id
    assert upload_files(area) == [
        uploaded.upload_id,
        f"{uploaded.upload_id}/slide.svs",
        f"{uploaded.upload_id}/upload.json",
    ]
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "slide.svs").stat().st_mode & 0o777 == 0o600
    assert (folder / "upload.json").stat().st_mode & 0o777 == 0o600
    running.stop(grace=0)
    assert own_files(area) == []  # uploads do not outlive the server


def test_oversized_uploads_are_refused_without_leftovers(upload_server) -> None:
    running, area = upload_server(upload_max_bytes=64 * 1024, upload_quota_bytes=MIB)
    big = bytes(64 * 1024 + 1)
    # Declared over the cap: refused before any byte is stored.
    with (
        SlideClient(running.target, retry=None, timeout=30) as client,
        pytest.raises(SlideTooLargeError),
    ):
        client.upload(big, suffix=".svs")
    # Declared within the cap, then more bytes: cut off while streaming.
    fits = big[:-1]
    requests = [metadata(fits), *chunks(fits, 16 * 1024), pb.UploadSlideRequest(chunk=b"x")]
    assert upload_error(running.target, requests) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SLIDE_TOO_LARGE",
    )
    # Declared small, sent more: refused at the declared size.
    small = bytes(1000)
    requests = [metadata(small), *chunks(small), pb.UploadSlideRequest(chunk=b"more")]
    assert upload_error(running.target, requests) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UPLOAD_INVALID",
    )
    assert upload_files(area) == []
    assert running.uploads.used_bytes == 0


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("checksum", grpc.StatusCode.DATA_LOSS, "UPLOAD_CHECKSUM_MISMATCH"),
        ("short", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("no-metadata", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("twice-metadata", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("suffix", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("multi-file-vms", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("file-name-suffix", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("bad-sha", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("zero-size", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("huge-chunk", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("empty-chunk", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
        ("empty-stream", grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_INVALID"),
    ],
)
def test_malformed_uploads(upload_server, case: str, code, reason: str) -> None:
    running, area = upload_server()
    data = bytes(range(256)) * 40
    requests = {
        "checksum": [metadata(data, sha="0" * 64), *chunks(data)],
        "short": [metadata(data), *chunks(data[:-1])],
        "no-metadata": chunks(data),
        "twice-metadata": [metadata(data), metadata(data)],
        "suffix": [metadata(data, suffix=".exe"), *chunks(data)],
        "multi-file-vms": [metadata(data, suffix=".vms"), *chunks(data)],
        "file-name-suffix": [metadata(data, suffix="patient-smith.svs"), *chunks(data)],
        "bad-sha": [metadata(data, sha="xyz"), *chunks(data)],
        "zero-size": [metadata(b""), pb.UploadSlideRequest(chunk=b"a")],
        "huge-chunk": [
            metadata(bytes(MIB + 1)),
            pb.UploadSlideRequest(chunk=bytes(MIB + 1)),
        ],
        "empty-chunk": [metadata(data), pb.UploadSlideRequest(chunk=b""), *chunks(data)],
        "empty-stream": [],
    }[case]
    assert upload_error(running.target, requests) == (code, reason)
    assert upload_files(area) == []
    assert running.uploads.used_bytes == 0


def test_client_errors_map_to_upload_classes(upload_server) -> None:
    running, _ = upload_server(upload_max_bytes=4096, upload_quota_bytes=8192)
    with SlideClient(running.target, retry=None, timeout=30) as client:
        with pytest.raises(UploadError):
            client.upload(b"abc", suffix=".txt")
        first = client.upload(bytes(4096), suffix=".tiff")
        second = client.upload(bytes(4095) + b"\x01", suffix=".tiff")
        assert first.upload_id != second.upload_id
        with pytest.raises(UploadQuotaError):
            client.upload(b"one more byte", suffix=".tiff")
    assert isinstance(UploadChecksumError("x"), UploadError)


def test_interrupted_upload_leaves_nothing(upload_server) -> None:
    running, area = upload_server()
    data = bytes(4 * MIB)
    sent_two = threading.Event()
    release = threading.Event()

    def stalling() -> Iterator[pb.UploadSlideRequest]:
        yield metadata(data)
        for i, request in enumerate(chunks(data)):
            if i == 2:
                sent_two.set()
                release.wait(30)  # hold the stream open mid-upload
            yield request

    future = insecure_stub(running.target).UploadSlide.future(stalling(), timeout=60)
    assert sent_two.wait(30)
    assert wait_for(lambda: any(name.endswith(".part") for name in own_files(area)))
    assert running.uploads.used_bytes == len(data)  # reserved while in flight
    future.cancel()
    release.set()
    assert wait_for(lambda: upload_files(area) == [] and running.uploads.used_bytes == 0)
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    # The server carries on: a new upload of the same size fits the quota again.
    with SlideClient(running.target, timeout=30) as client:
        assert client.upload(data, suffix=".svs").size_bytes == len(data)


def test_stalled_upload_without_deadline_is_cut_off(upload_server) -> None:
    running, area = upload_server(default_deadline_s=1.0)
    data = bytes(3 * MIB)
    done = threading.Event()

    def stalling() -> Iterator[pb.UploadSlideRequest]:
        yield metadata(data)
        yield chunks(data)[0]
        done.wait(30)  # never sends the rest

    future = insecure_stub(running.target).UploadSlide.future(stalling())  # no deadline
    # Past the default deadline the call ends at once, though the client is silent
    # (no thread waits for its next message), and the partial file and quota are freed.
    assert wait_for(lambda: any(n.endswith(".part") for n in own_files(area)))
    with pytest.raises(grpc.RpcError) as info:
        future.result(timeout=30)
    assert status_of(info.value) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
    assert upload_files(area) == [] and running.uploads.used_bytes == 0
    done.set()


def test_upload_ids_resolve_only_for_their_owner(start_inprocess_server, tmp_path) -> None:
    tokens = write_tokens(
        tmp_path / "tokens.json",
        {"token-one-" + "1" * 40: ("lis-a", ["analyze", "upload"]),
         "token-two-" + "2" * 40: ("lis-b", ["analyze", "upload"])},
    )  # fmt: skip
    running = start_inprocess_server(tokens_file=tokens, upload_dir=tmp_path / "up")
    tiny = (Path(running.config.slide_root) / TINY).read_bytes()
    with SlideClient(running.target, token="token-one-" + "1" * 40, timeout=60) as a:
        uploaded = a.upload(tiny, suffix=".svs")
        assert a.analyze(uploaded, AnalysisOptions()).outcome in {"completed", "no_tissue"}
    with SlideClient(running.target, token="token-two-" + "2" * 40, retry=None) as b:
        with pytest.raises(SlideNotFoundError):
            b.analyze(uploaded)
        with pytest.raises(SlideNotFoundError):
            b.analyze(UploadedSlide("A" * 32))
        with pytest.raises(SlidePathError):
            b.analyze(UploadedSlide("../../etc/passwd"))


def test_store_quota_expiry_and_concurrency(tmp_path: Path) -> None:
    from histohelper.server.uploads import UploadStore

    now = [1000.0]
    store = UploadStore(
        tmp_path,
        max_bytes=100,
        quota_bytes=150,
        ttl_s=10,
        max_concurrent=2,
        clock=lambda: now[0],
        sweep_interval_s=0,
    )
    data = bytes(100)
    sha = hashlib.sha256(data).hexdigest()

    def put(owner: str = "me"):
        writer = store.begin(100, sha, ".svs", owner)
        writer.write(data)
        return writer.commit()

    first = put()
    with pytest.raises(UploadQuotaError):
        store.begin(100, sha, ".svs", "me")  # 100 stored + 100 > 150
    now[0] += 8
    assert store.resolve(first.upload_id, "me").path == first.path  # renews to t+18
    now[0] += 8
    assert store.sweep() == 0
    now[0] += 3
    assert store.sweep() == 1 and not first.path.exists() and store.used_bytes == 0
    with pytest.raises(SlideNotFoundError):
        store.resolve(first.upload_id, "me")
    a = store.begin(10, sha, ".svs", "me")
    with store.slot(), store.slot(), pytest.raises(UploadQuotaError, match="in flight"):
        store.slot().__enter__()
    with store.slot():
        pass  # slots come back
    a.abort()
    a.abort()  # idempotent
    assert store.used_bytes == 0 and upload_files(tmp_path) == []
    store.close()


def test_store_start_purges_only_its_own_files(tmp_path: Path) -> None:
    from histohelper.server.uploads import UploadStore

    (tmp_path / ("A" * 32 + ".svs")).write_bytes(b"old upload")
    (tmp_path / ("B" * 32)).mkdir()
    (tmp_path / ("B" * 32) / "slide.dcm").write_bytes(b"old upload in its directory")
    (tmp_path / "tmp-abcdefghijklmnopqrstuv.part").write_bytes(b"crashed")
    (tmp_path / "keep-me.svs").write_bytes(b"not ours")
    store = UploadStore(tmp_path, max_bytes=10, quota_bytes=10, ttl_s=1, sweep_interval_s=0)
    assert upload_files(tmp_path) == ["keep-me.svs"]
    store.close()
    assert own_files(tmp_path) == ["keep-me.svs"]
    private = UploadStore(None, max_bytes=10, quota_bytes=10, ttl_s=1, sweep_interval_s=0)
    assert private.root.stat().st_mode & 0o777 == 0o700
    private.close()
    assert not private.root.exists()


def test_async_client_uploads_and_analyzes(upload_server, slides_dir: Path) -> None:
    import asyncio

    from histohelper.client import AsyncSlideClient

    running, area = upload_server()
    tiny = (slides_dir / TINY).read_bytes()

    async def main() -> tuple[UploadedSlide, str]:
        async with AsyncSlideClient(running.target, timeout=60) as client:
            uploaded = await client.upload(tiny, suffix=".svs")
            result = await client.analyze(uploaded, AnalysisOptions())
            with pytest.raises(UploadError):
                await client.upload(b"abc", suffix=".txt")
            return uploaded, result.outcome

    uploaded, outcome = asyncio.run(main())
    assert outcome in {"completed", "no_tissue"}
    assert upload_files(area) == [
        uploaded.upload_id,
        f"{uploaded.upload_id}/slide.svs",
        f"{uploaded.upload_id}/upload.json",
    ]


def test_connection_age_frees_a_slot_held_by_a_silent_stream(upload_server) -> None:
    """A client that opens UploadSlide and never sends holds the only upload slot;
    the connection's maximum age (then its grace) closes it and frees the slot."""
    running, _ = upload_server(
        max_concurrent_uploads=1, max_connection_age_s=1.0, max_connection_age_grace_s=1.0
    )
    silent = threading.Event()

    def nothing() -> Iterator[pb.UploadSlideRequest]:
        silent.wait(60)
        return
        yield  # a stream that sends nothing

    channel = grpc.insecure_channel(running.target)
    held = pb_grpc.SlideAnalysisServiceStub(channel).UploadSlide.future(nothing())
    data = bytes(range(256)) * 8
    t0 = time.monotonic()
    # The silent call holds the slot before the client below asks for it.
    assert wait_for(lambda: running.call_path.pools["upload"].in_use == 1)
    with SlideClient(running.target, timeout=30, retry=None) as client:
        while True:
            try:
                uploaded = client.upload(data, suffix=".svs")
                break
            except UploadQuotaError as err:  # while the silent call holds the slot
                assert "in flight" in str(err), err
                assert time.monotonic() - t0 < 120, "the silent stream was never closed"
                time.sleep(0.2)
    assert uploaded.size_bytes == len(data)
    assert held.done() or wait_for(held.done)
    silent.set()
    channel.close()
