"""The result cache of AnalyzeSlide (issue 19), over real servers on loopback.

A hit replays the miss bit for bit and says ``cached``; any change of option, slide
content or model misses; damaged entries are recomputed, never served; identical
requests in flight compute once; the directory stays under its bound; failed and
cancelled analyses store nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as syn

from histohelper.client import AnalysisOptions, SlideClient
from histohelper.errors import CorruptSlideError
from histohelper.server.cache import (
    ENTRY_HEADER,
    ENTRY_SUFFIX,
    CacheDirError,
    ResultCache,
)

OPTIONS = AnalysisOptions(return_embeddings=True, return_attention=True, return_cams=True)


def _write(path: Path, seed: int, boxes: list[tuple[int, int, int, int]]) -> Path:
    img = syn.slide_with_tissue(1400, 1800, boxes, seed=seed)
    return syn.write_slide(path, img, [(450, 350)])


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.tiff and b.tiff (different tissue, same size) and bad.tiff (tiles that fail)."""
    root = tmp_path_factory.mktemp("cache-slides")
    _write(root / "a.tiff", 1, [(100, 100, 900, 700)])
    _write(root / "b.tiff", 5, [(600, 300, 1000, 800)])
    bad = syn.write_slide(
        root / "bad.tiff",
        syn.slide_with_tissue(1400, 1800, [(0, 0, 1800, 1400)], seed=2),
        [(450, 350)],
        compression="jpeg",
    )
    for tile in range(0, 24, 2):
        syn.corrupt_tile(bad, 0, tile)
    return root


@pytest.fixture
def server(start_inprocess_server, slide_root: Path, tmp_path: Path):
    """A server with a result cache in ``tmp_path / "cache"``."""
    return start_inprocess_server(slide_root=slide_root, cache_dir=tmp_path / "cache")


def _store(running) -> ResultCache:
    return running.servicer.cache.store


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob(f"entries/*/*{ENTRY_SUFFIX}"))


def _temporaries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("entries/*/*.tmp"))


def _assert_same_result(a, b) -> None:
    """Every array and field of two SlideResults equal, bit for bit."""
    for f in fields(a.patches):
        x, y = getattr(a.patches, f.name), getattr(b.patches, f.name)
        assert (x is None) == (y is None), f.name
        if x is not None:
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f.name
    for name in ("heatmaps", "attention_map"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.prediction == b.prediction
    for name in ("slide", "grid", "model", "qc", "outcome"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.thumbnail == b.thumbnail and a.tissue_mask_png == b.tissue_mask_png


def test_a_hit_replays_the_miss_bit_for_bit_and_says_cached(server) -> None:
    with SlideClient(server.target) as client:
        first = client.analyze("a.tiff", OPTIONS, request_id="first-call")
        jobs = server.worker.jobs_done
        second = client.analyze("a.tiff", OPTIONS, request_id="second-call")
    assert first.patch_count > 10 and first.patches.cams is not None
    assert first.patches.embeddings is not None and first.has_attention
    assert (first.cached, second.cached) == (False, True)
    assert server.worker.jobs_done == jobs  # no model call for the hit
    _assert_same_result(first, second)
    assert (first.request_id, second.request_id) == ("first-call", "second-call")
    assert second.timings.inference_s == 0.0 and second.timings.total_s > 0
    assert _store(server).counts["hit"] == 1


def test_a_changed_option_misses(server) -> None:
    with SlideClient(server.target) as client:
        base = client.analyze("a.tiff", AnalysisOptions(min_tissue_fraction=0.5))
        other = client.analyze("a.tiff", AnalysisOptions(min_tissue_fraction=0.9))
        batch = client.analyze("a.tiff", AnalysisOptions(min_tissue_fraction=0.5, batch_size=8))
        again = client.analyze("a.tiff", AnalysisOptions(min_tissue_fraction=0.5))
    assert [r.cached for r in (base, other, batch, again)] == [False, False, False, True]
    assert other.patch_count < base.patch_count
    assert len(_entries(server.config.cache_dir)) == 3


def test_a_changed_slide_file_misses(server, slide_root: Path) -> None:
    moving = slide_root / "moving.tiff"
    shutil.copyfile(slide_root / "a.tiff", moving)
    with SlideClient(server.target) as client:
        before = client.analyze("moving.tiff")
        shutil.copyfile(slide_root / "b.tiff", moving)  # same name, new content
        after = client.analyze("moving.tiff")
        b = client.analyze("b.tiff")
    assert (before.cached, after.cached) == (False, False)
    assert before.patches.x_l0.tobytes() != after.patches.x_l0.tobytes()
    assert b.cached  # same content as the new moving.tiff: the key is the content
    _assert_same_result(after, b)


def _damage(entry: Path, how: str) -> None:
    data = bytearray(entry.read_bytes())
    if how == "flipped":
        middle = ENTRY_HEADER.size + (len(data) - ENTRY_HEADER.size) // 2
        data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    elif how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # an entry of another format version
        data[4:8] = (99).to_bytes(4, "big")
    entry.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flipped", "truncated", "wrong-version"])
def test_a_damaged_entry_is_recomputed_and_replaced(server, how: str) -> None:
    with SlideClient(server.target) as client:
        first = client.analyze("a.tiff", OPTIONS)
        (entry,) = _entries(server.config.cache_dir)
        _damage(entry, how)
        jobs = server.worker.jobs_done
        again = client.analyze("a.tiff", OPTIONS)
        assert server.worker.jobs_done > jobs  # recomputed, not served
        third = client.analyze("a.tiff", OPTIONS)
    assert (first.cached, again.cached, third.cached) == (False, False, True)
    _assert_same_result(first, again)
    _assert_same_result(first, third)
    assert _store(server).counts["corrupt"] == 1
    assert _entries(server.config.cache_dir) == [entry]


def _gate_model(worker) -> threading.Event:
    """Hold the model worker's thread until the returned event is set."""
    gate = threading.Event()
    worker.call(gate.wait)
    return gate


def test_identical_requests_in_flight_compute_once(server) -> None:
    options = AnalysisOptions(return_attention=True)
    results: dict[str, object] = {}
    with SlideClient(server.target) as client:
        jobs0 = server.worker.jobs_done
        gate = _gate_model(server.worker)

        def run(name: str) -> None:
            results[name] = client.analyze("a.tiff", options, request_id=name)

        threads = [threading.Thread(target=run, args=(n,)) for n in ("one", "two")]
        for t in threads:
            t.start()
        assert _store(server).wait_for_waiters(1, timeout=60)
        gate.set()
        for t in threads:
            t.join(60)
        pair_jobs = server.worker.jobs_done - jobs0 - 1  # less the gate
        jobs1 = server.worker.jobs_done
        single = client.analyze("a.tiff", AnalysisOptions(return_attention=False))
        single_jobs = server.worker.jobs_done - jobs1
    one, two = results["one"], results["two"]
    assert sorted([one.cached, two.cached]) == [False, True]  # type: ignore[attr-defined]
    assert not single.cached and pair_jobs == single_jobs  # one analysis's model calls
    _assert_same_result(one, two)


def test_a_waiter_computes_itself_when_the_first_is_cancelled(server) -> None:
    results = {}
    with SlideClient(server.target) as client:
        gate = _gate_model(server.worker)
        first = client.stream("a.tiff", request_id="leaves")
        next(first)  # AnalysisStarted: the first call is computing

        def run() -> None:
            results["waiter"] = client.analyze("a.tiff", request_id="waits")

        waiter = threading.Thread(target=run)
        waiter.start()
        assert _store(server).wait_for_waiters(1, timeout=60)
        first.close()  # cancels the first call
        gate.set()
        waiter.join(60)
        again = client.analyze("a.tiff")
    assert results["waiter"].cached is False
    assert again.cached


def test_failed_and_cancelled_analyses_store_nothing(server) -> None:
    cache_dir = server.config.cache_dir
    with SlideClient(server.target) as client:
        with pytest.raises(CorruptSlideError):
            client.analyze("bad.tiff")
        gate = _gate_model(server.worker)
        stream = client.stream("b.tiff")
        next(stream)
        stream.close()
        gate.set()
        assert server.servicer.wait_idle(60)
    assert _entries(cache_dir) == [] and _temporaries(cache_dir) == []


def test_an_entry_over_the_bound_is_not_stored(start_inprocess_server, slide_root, tmp_path):
    running = start_inprocess_server(
        slide_root=slide_root, cache_dir=tmp_path / "c", cache_max_bytes=4096
    )
    with SlideClient(running.target) as client:
        results = [client.analyze("a.tiff").cached for _ in range(2)]
    assert results == [False, False]
    assert _entries(tmp_path / "c") == [] and _temporaries(tmp_path / "c") == []
    assert _store(running).counts["too_large"] == 2


def _put(cache: ResultCache, key: str, size: int) -> None:
    writer = cache.writer(key)
    writer.add(bytes(size))
    assert cache.store(writer)


def test_eviction_keeps_the_directory_under_its_bound_least_recently_used_first(
    tmp_path: Path,
) -> None:
    cache = ResultCache(tmp_path, max_bytes=250_000)
    keys = [f"{i:02x}" * 32 for i in range(6)]
    for i, key in enumerate(keys):
        _put(cache, key, 100_000)
        if i >= 1:
            found = cache.lookup(keys[0])  # keeps the first one in use
            assert found.entry is not None
            found.entry.close()
        assert cache.size_bytes() <= 250_000
    kept = {p.stem for p in _entries(tmp_path)}
    assert kept == {keys[0], keys[5]}
    assert cache.counts["evicted"] == 4


def test_eviction_tolerates_entries_vanishing(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path, max_bytes=150_000)
    other = ResultCache(tmp_path, max_bytes=150_000)  # another replica on the same dir
    keys = [f"{i:02x}" * 32 for i in range(3)]
    for key in keys:
        _put(cache, key, 100_000)
    for path in _entries(tmp_path):
        path.unlink()  # removed behind its back
    _put(other, keys[0], 100_000)
    assert cache.evict() == 0
    found = cache.lookup(keys[0])
    assert found.entry is not None
    found.entry.close()


def test_an_unusable_cache_dir_stops_the_server_with_a_clear_message(
    start_inprocess_server, model_artifact: Path, slide_root: Path, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(CacheDirError, match=r"--cache-dir .* is not a usable directory"):
        start_inprocess_server(slide_root=slide_root, cache_dir=not_a_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "histohelper.cli", "serve", "--model", str(model_artifact),
         "--slide-root", str(slide_root), "--port", "0", "--cache-dir", str(not_a_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "histohelper serve: --cache-dir" in proc.stderr
    assert "is not a usable directory" in proc.stderr


def test_an_upload_is_keyed_by_its_sha256_like_the_same_file_by_path(
    server, slide_root: Path
) -> None:
    with SlideClient(server.target) as client:
        by_path = client.analyze("b.tiff")
        uploaded = client.upload(slide_root / "b.tiff")
        by_upload = client.analyze(uploaded)
    assert by_upload.cached
    _assert_same_result(by_path, by_upload)
    assert np.isfinite(by_upload.patches.probabilities).all()


def test_hits_and_misses_are_counted_in_prometheus(
    start_inprocess_server, slide_root: Path, tmp_path: Path
) -> None:
    from metrics_support import free_port, samples, scrape_text

    running = start_inprocess_server(
        slide_root=slide_root, cache_dir=tmp_path / "c", metrics_port=free_port()
    )
    with SlideClient(running.target) as client:
        for fraction in (0.5, 0.5, 0.5, 0.9):
            client.analyze("b.tiff", AnalysisOptions(min_tissue_fraction=fraction))
    counts = samples(scrape_text(running.metrics_port))["histohelper_cache_requests_total"]
    assert counts[(("result", "hit"),)] == 2 and counts[(("result", "miss"),)] == 2


def test_the_cli_line_and_summary_json_say_cached(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from histohelper.client.cli import main

    lines, summaries = [], []
    for run in ("miss", "hit"):
        out = tmp_path / run
        argv = ["analyze", "b.tiff", "--server", server.target, "--out", str(out), "-q"]
        rc = main(argv)
        printed = capsys.readouterr()
        assert rc == 0, printed.err
        lines.append(printed.out.strip().splitlines()[-1])
        summaries.append(json.loads((out / "summary.json").read_text()))
    # Should this ever fail: what was printed and what the cache counted say why.
    counts = dict(_store(server).counts)
    assert [s["cached"] for s in summaries] == [False, True], (lines, counts)
    assert "(cached)" in lines[1] and "(cached)" not in lines[0]
