"""Soak: 8 concurrent clients mixing good, bad and cancelled calls against a real
``histohelper serve`` process on 127.0.0.1, for a bounded time.

Every good request must get its complete result (CMU equal to a reference run);
every bad one its mapped error; cancellations must not disturb anyone. The server's
RSS and open file descriptors are sampled (psutil) after a warm-up and at the end
and must stay flat; nothing may be left in the upload area. Figures are printed
(``pytest -s``).
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from hardening_support import CMU, TINY, insecure_stub, own_files
from server_fixtures import spawn_server, stop_server

from histohelper.client import AnalysisOptions, SlideClient
from histohelper.client.events import PatchBatch
from histohelper.client.uploads import UploadedSlide
from histohelper.errors import (
    CorruptSlideError,
    HistoHelperError,
    ServerBusyError,
    SlideNotFoundError,
    SlidePathError,
    UnsupportedSlideError,
    UploadChecksumError,
)
from histohelper.v1 import slide_analysis_pb2 as pb

CLIENTS = 8
WARMUP_S = 10.0
SOAK_S = 20.0
#: The server runs with MALLOC_ARENA_MAX=2 (as README recommends): measured over six
#: 20 s mixed phases its RSS went 972, 984, 1005, 1016, 1022, 1022 MiB (converging);
#: with glibc's default arenas it wandered 1109..1244 MiB between phases.
MAX_RSS_GROWTH_BYTES = 96 * 1024 * 1024
MAX_FD_GROWTH = 12
OPTIONS = AnalysisOptions(return_attention=True)

pytestmark = pytest.mark.slow


def server_usage(proc: psutil.Process) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of the server process."""
    return proc.memory_info().rss, proc.num_fds()


def settled_usage(proc: psutil.Process) -> tuple[int, int]:
    """Usage once cancelled calls have wound down: the least of five samples over ~1 s."""
    samples = []
    for _ in range(5):
        samples.append(server_usage(proc))
        time.sleep(0.25)
    return min(s[0] for s in samples), min(s[1] for s in samples)


def run_phase(soak: Soak, seconds: float, seed: int) -> tuple[float, int, int]:
    """Run the clients for ``seconds``; returns (duration, peak RSS, peak fds)."""
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=soak.run_client, args=(seed + i, t0 + seconds))
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    peak_rss = peak_fds = 0
    while any(t.is_alive() for t in threads):
        threads[0].join(timeout=1.0)
        rss, fds = server_usage(soak.proc)
        peak_rss, peak_fds = max(peak_rss, rss), max(peak_fds, fds)
    return time.monotonic() - t0, peak_rss, peak_fds


class Soak:
    """Shared state of the soak's client threads."""

    def __init__(
        self, target: str, slides: Path, reference: np.ndarray, proc: psutil.Process
    ) -> None:
        self.target = target
        self.proc = proc
        self.slides = slides
        self.reference = reference
        self.tiny_bytes = (slides / TINY).read_bytes()
        self.lock = threading.Lock()
        self.done = Counter[str]()
        self.good_completed = 0
        self.busy_retries = 0
        self.failures: list[str] = []

    def count(self, kind: str) -> None:
        with self.lock:
            self.done[kind] += 1

    def fail(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.failures.append(f"{kind}: {type(exc).__name__}: {exc}")

    # --- good ---------------------------------------------------------------------

    def until_admitted(self, call: Callable[[], object]) -> object:
        """Run ``call``, retrying SERVER_BUSY (the documented contract) for up to 60 s."""
        end = time.monotonic() + 60
        delay = 0.05
        while True:
            try:
                return call()
            except ServerBusyError:
                with self.lock:
                    self.busy_retries += 1
                if time.monotonic() > end:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)

    def good_cmu(self, client: SlideClient) -> None:
        result = self.until_admitted(lambda: client.analyze(CMU, OPTIONS))
        assert result.outcome == "completed"
        assert result.qc.patch_count == len(result.patches.patch_index) > 0
        assert result.qc.patch_count == result.grid.patch_count
        assert np.isfinite(result.patches.probabilities).all()
        np.testing.assert_allclose(result.prediction.probabilities, self.reference, atol=1e-4)
        assert result.has_attention and abs(result.patches.attention.sum() - 1) < 1e-3

    def good_tiny(self, client: SlideClient) -> None:
        result = self.until_admitted(lambda: client.analyze(TINY, OPTIONS))
        assert result.outcome in {"completed", "no_tissue"}

    def good_upload(self, client: SlideClient) -> None:
        uploaded = client.upload(self.tiny_bytes, suffix=".svs")
        result = self.until_admitted(lambda: client.analyze(uploaded, OPTIONS))
        assert result.outcome in {"completed", "no_tissue"}

    # --- bad ----------------------------------------------------------------------

    @staticmethod
    def expect(error: type[HistoHelperError], call: Callable[[], object]) -> None:
        try:
            call()
        except error:
            return
        raise AssertionError(f"expected {error.__name__}")

    def bad(self, client: SlideClient, rng: random.Random) -> None:
        case = rng.choice(["not-a-tiff", "traversal", "corrupt", "missing", "checksum", "id"])
        if case == "not-a-tiff":
            self.expect(
                UnsupportedSlideError,
                lambda: self.until_admitted(lambda: client.analyze("bad/not-a-tiff.svs")),
            )
        elif case == "traversal":
            self.expect(
                SlidePathError,
                lambda: self.until_admitted(lambda: client.analyze("../../etc/passwd")),
            )
        elif case == "corrupt":
            self.expect(
                CorruptSlideError,
                lambda: self.until_admitted(lambda: client.analyze("bad/corrupt-tile.svs")),
            )
        elif case == "missing":
            self.expect(
                SlideNotFoundError,
                lambda: self.until_admitted(lambda: client.analyze("real/missing.svs")),
            )
        elif case == "checksum":
            requests = [
                pb.UploadSlideRequest(
                    metadata=pb.UploadSlideMetadata(
                        size_bytes=len(self.tiny_bytes), sha256_hex="0" * 64, suffix=".svs"
                    )
                ),
                pb.UploadSlideRequest(chunk=self.tiny_bytes),
            ]
            stub = insecure_stub(self.target)
            try:
                stub.UploadSlide(iter(requests), timeout=30)
                raise AssertionError("checksum mismatch accepted")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.DATA_LOSS
                assert UploadChecksumError.code == "DATA_LOSS"
        else:
            self.expect(
                SlideNotFoundError,
                lambda: self.until_admitted(lambda: client.analyze(UploadedSlide("Z" * 32))),
            )

    # --- cancelled ----------------------------------------------------------------

    def cancelled(self, client: SlideClient, rng: random.Random) -> None:
        if rng.random() < 0.7:
            stream = client.stream(CMU, AnalysisOptions(batch_size=4))
            try:
                for event in stream:
                    if isinstance(event, PatchBatch):
                        break
            except ServerBusyError:
                pass  # refused before it started: nothing to cancel
            finally:
                stream.close()  # cancels the call
            return
        # An upload cancelled by the client half-way (its request iterator fails).
        data = bytes(3 * 1024 * 1024)

        def broken() -> Iterator[pb.UploadSlideRequest]:
            yield pb.UploadSlideRequest(
                metadata=pb.UploadSlideMetadata(
                    size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest(), suffix=".svs"
                )
            )
            yield pb.UploadSlideRequest(chunk=data[: 1024 * 1024])
            raise ConnectionAbortedError("client gave up")

        stub = insecure_stub(self.target)
        with pytest.raises(grpc.RpcError):
            stub.UploadSlide(broken(), timeout=30)

    # --- driver -------------------------------------------------------------------

    def run_client(self, seed: int, stop_at: float) -> None:
        rng = random.Random(seed)
        with SlideClient(self.target, timeout=120) as client:
            while time.monotonic() < stop_at:
                roll = rng.random()
                if roll < 0.5:
                    kind = rng.choice(["good_cmu", "good_cmu", "good_tiny", "good_upload"])
                elif roll < 0.75:
                    kind = "bad"
                else:
                    kind = "cancelled"
                try:
                    if kind == "good_cmu":
                        self.good_cmu(client)
                    elif kind == "good_tiny":
                        self.good_tiny(client)
                    elif kind == "good_upload":
                        self.good_upload(client)
                    elif kind == "bad":
                        self.bad(client, rng)
                    else:
                        self.cancelled(client, rng)
                except BaseException as exc:  # every failure is reported
                    self.fail(kind, exc)
                    continue
                self.count(kind)
                if kind.startswith("good"):
                    with self.lock:
                        self.good_completed += 1


def test_soak_mixed_concurrent_clients(
    model_artifact, slides_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_dir = tmp_path / "uploads"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # inherited by the server process
    server = spawn_server(
        model_artifact, slides_dir, tmp_path,
        "--max-concurrent", "4", "--upload-dir", str(upload_dir), "--upload-ttl-s", "30",
        "--audit-log", str(tmp_path / "audit.jsonl"), "--log-level", "WARNING",
    )  # fmt: skip
    try:
        proc = psutil.Process(server.process.pid)
        with SlideClient(server.target, timeout=120) as client:
            reference = client.analyze(CMU, OPTIONS).prediction.probabilities
        soak = Soak(server.target, slides_dir, np.asarray(reference), proc)
        start_usage = server_usage(proc)
        # Warm-up: the same mix, so caches, thread pools and allocator arenas fill up.
        run_phase(soak, WARMUP_S, seed=0)
        warm_done = dict(soak.done)
        soak.done.clear()
        rss0, fds0 = settled_usage(proc)
        duration, peak_rss, peak_fds = run_phase(soak, SOAK_S, seed=100)
        rss1, fds1 = settled_usage(proc)
        leftovers = [n for n in own_files(upload_dir) if n.endswith(".part")]
        total = sum(soak.done.values())
        print(
            f"\nsoak: {CLIENTS} clients, warm-up {warm_done}; soak {duration:.1f} s, "
            f"{total} calls {dict(sorted(soak.done.items()))}, good completed "
            f"{soak.good_completed} (incl. warm-up), SERVER_BUSY retries {soak.busy_retries}, "
            f"failures {len(soak.failures)}\n"
            f"server RSS MiB: start {start_usage[0] / 2**20:.1f}, after warm-up "
            f"{rss0 / 2**20:.1f}, peak {peak_rss / 2**20:.1f}, end {rss1 / 2**20:.1f} "
            f"(growth {(rss1 - rss0) / 2**20:+.1f})\n"
            f"server fds: start {start_usage[1]}, after warm-up {fds0}, peak {peak_fds}, "
            f"end {fds1} (growth {fds1 - fds0:+d}); partial uploads left: {len(leftovers)}; "
            f"stored uploads: {len(own_files(upload_dir))}"
        )
        assert soak.failures == [], soak.failures[:5]
        assert soak.good_completed >= CLIENTS and soak.done["bad"] and soak.done["cancelled"]
        assert rss1 - rss0 <= MAX_RSS_GROWTH_BYTES
        assert fds1 - fds0 <= MAX_FD_GROWTH
        assert leftovers == []
    finally:
        status = stop_server(server)
    assert status == 0
    assert own_files(upload_dir) == []
    assert "Traceback" not in server.log_text()
