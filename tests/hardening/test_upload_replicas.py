"""Replicas sharing one upload area (issue 19): an upload_id works on every server using
the directory; expiry, quota, clean-up of dead servers and the last server's clean-up
work across them.

The clock of records and expiry is a fake one shared by the stores (expiry needs time
to pass; nothing here sleeps for it).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as syn
from hardening_support import own_files, upload_files

from histohelper.client import AnalysisOptions, SlideClient, UploadedSlide
from histohelper.errors import SlideNotFoundError, UploadQuotaError
from histohelper.server.uploads import REPLICAS, UploadStore

TTL_S = 600.0


class FakeClock:
    """Seconds, moved by hand; shared by every store of a test."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def store(root: Path, clock: FakeClock, quota: int = 1000) -> UploadStore:
    return UploadStore(
        root, max_bytes=quota, quota_bytes=quota, ttl_s=TTL_S, clock=clock, sweep_interval_s=0
    )


def put(s: UploadStore, data: bytes, owner: str = "me") -> str:
    writer = s.begin(len(data), hashlib.sha256(data).hexdigest(), ".svs", owner)
    writer.write(data)
    return writer.commit().upload_id


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 1,024 x 768 px synthetic slide with tissue (a few dozen patches)."""
    img = syn.slide_with_tissue(768, 1024, [(100, 80, 700, 560)], seed=3)
    path = syn.write_slide(tmp_path_factory.mktemp("replica-slide") / "s.tiff", img, [(256, 192)])
    return path.read_bytes()


def test_upload_on_one_server_analyse_on_the_other(
    start_inprocess_server, tmp_path: Path, small_slide: bytes, clock: FakeClock
) -> None:
    area = tmp_path / "shared-uploads"
    first = start_inprocess_server(upload_dir=area, upload_ttl_s=TTL_S)
    second = start_inprocess_server(upload_dir=area, upload_ttl_s=TTL_S)
    for running in (first, second):
        running.uploads.clock = clock
    options = AnalysisOptions(return_attention=True)
    with SlideClient(first.target, timeout=300) as a, SlideClient(second.target, timeout=300) as b:
        uploaded = a.upload(small_slide, suffix=".tiff")
        on_second = b.analyze(uploaded, options)
        on_first = a.analyze(UploadedSlide(uploaded.upload_id), options)
        assert on_second.outcome == "completed" and len(on_second.patches.patch_index) > 0
        assert on_second.prediction is not None and on_first.prediction is not None
        np.testing.assert_array_equal(
            on_second.prediction.probabilities, on_first.prediction.probabilities
        )
        np.testing.assert_array_equal(
            on_second.patches.probabilities, on_first.patches.probabilities
        )
        np.testing.assert_array_equal(on_second.patches.attention, on_first.patches.attention)
        # A use on either server renews the upload for both.
        clock.now += 0.75 * TTL_S
        b.analyze(uploaded, AnalysisOptions())
        clock.now += 0.75 * TTL_S
        assert a.analyze(uploaded, AnalysisOptions()).outcome == "completed"
        # Expiry is seen by both, and the sweep of either deletes it from the area.
        clock.now += TTL_S
        for client in (a, b):
            with pytest.raises(SlideNotFoundError):
                client.analyze(uploaded, AnalysisOptions())
        assert uploaded.upload_id in upload_files(area)
        assert second.uploads.sweep() == 1
        assert first.uploads.sweep() == 0
        assert upload_files(area) == []
    first.stop(grace=0, drain=0)
    second.stop(grace=0, drain=0)
    assert own_files(area) == []


def test_owner_checks_hold_on_every_server(tmp_path: Path, clock: FakeClock) -> None:
    one, two = store(tmp_path, clock), store(tmp_path, clock)
    try:
        upload_id = put(one, b"x" * 100, owner="lis-a")
        assert two.resolve(upload_id, "lis-a").size_bytes == 100
        with pytest.raises(SlideNotFoundError):
            two.resolve(upload_id, "lis-b")
        with pytest.raises(SlideNotFoundError):
            one.resolve(upload_id, "lis-b")
    finally:
        one.close()
        two.close()


def test_quota_counts_every_servers_uploads(tmp_path: Path, clock: FakeClock) -> None:
    one, two = store(tmp_path, clock, quota=150), store(tmp_path, clock, quota=150)
    try:
        writer = one.begin(100, hashlib.sha256(b"y" * 100).hexdigest(), ".svs", "me")
        assert two.used_bytes == 100  # in flight on the other server
        with pytest.raises(UploadQuotaError):
            two.begin(100, "0" * 64, ".svs", "me")
        writer.write(b"y" * 100)
        upload_id = writer.commit().upload_id
        assert two.used_bytes == 100 and two.count == 1  # stored
        with pytest.raises(UploadQuotaError):
            two.begin(100, "0" * 64, ".svs", "me")
        clock.now += TTL_S
        two.begin(100, "0" * 64, ".svs", "me").abort()  # the sweep of begin expired it
        with pytest.raises(SlideNotFoundError):
            one.resolve(upload_id, "me")
        assert one.used_bytes == 0
    finally:
        one.close()
        two.close()


def test_uploads_live_while_any_server_uses_the_area(tmp_path: Path, clock: FakeClock) -> None:
    one, two = store(tmp_path, clock), store(tmp_path, clock)
    kept = put(one, b"a" * 10)
    one.close()  # not the last: its upload stays for the other
    assert two.resolve(kept, "me").path.read_bytes() == b"a" * 10
    three = store(tmp_path, clock)  # a restart beside a live server keeps the uploads
    assert three.resolve(kept, "me").size_bytes == 10
    three.close()
    assert two.resolve(kept, "me").size_bytes == 10
    two.close()  # the last server deletes every upload and the bookkeeping
    assert own_files(tmp_path) == []
    two.close()  # a second close does nothing


# A store in a child process on a shared area: it stores one upload, starts another,
# prints the stored id and waits to be killed mid-upload.
_CHILD = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from histohelper.server.uploads import UploadStore
    store = UploadStore(Path(sys.argv[1]), max_bytes=1000, quota_bytes=1000, ttl_s=600,
                        sweep_interval_s=0)
    data = b"k" * 300
    done = store.begin(300, hashlib.sha256(data).hexdigest(), ".svs", "me")
    done.write(data)
    upload_id = done.commit().upload_id
    half = store.begin(400, hashlib.sha256(b"h" * 400).hexdigest(), ".svs", "me")
    half.write(b"h" * 200)
    print(upload_id, store.replica_id, flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def child(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_killed_servers_files_in_flight_are_purged_its_uploads_kept(
    tmp_path: Path, child: subprocess.Popen[str]
) -> None:
    assert child.stdout is not None
    upload_id, replica = child.stdout.readline().split()  # the child is set up
    survivor = UploadStore(
        tmp_path, max_bytes=1000, quota_bytes=1000, ttl_s=600, sweep_interval_s=0
    )
    try:
        assert survivor.used_bytes == 700  # 300 stored + 400 reserved by the child
        part = [p for p in upload_files(tmp_path) if p.endswith(".part")]
        assert part and part[0].startswith(f"{REPLICAS}/{replica}/")
        survivor.sweep()
        assert survivor.used_bytes == 700  # a live server's upload in flight is kept
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert survivor.sweep() == 0
        assert [p for p in own_files(tmp_path) if replica in p] == []
        assert survivor.used_bytes == 300
        assert survivor.resolve(upload_id, "me").path.read_bytes() == b"k" * 300
    finally:
        survivor.close()
    assert own_files(tmp_path) == []
