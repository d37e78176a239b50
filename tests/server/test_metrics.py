"""Prometheus metrics scraped straight from a real in-process server's metrics port.

The server runs the session's artifact on a generated slide; its ``/metrics`` text is
parsed with ``prometheus_client``'s own parser. See test_metrics_prometheus.py for
the same metrics through a real Prometheus server.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import grpc
import pytest
from metrics_support import (
    MISSING,
    analyze,
    analyze_error,
    free_port,
    make_slide_root,
    samples,
    scrape_text,
)

from histohelper.server.metrics import ServerMetrics, is_loopback
from histohelper.server.observe import STAGES

CALLS = "histohelper_calls_total"


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slide_root(tmp_path_factory.mktemp("metrics-slides"))


def call_count(values: dict, rpc: str, code: str, reason: str = "") -> float:
    key = (("code", code), ("reason", reason), ("rpc", rpc))
    return values[CALLS].get(key, 0.0)


def test_scrape_after_calls_counts_each_outcome_stage_and_patch(
    start_inprocess_server, slide_root: Path
) -> None:
    running = start_inprocess_server(
        slide_root=slide_root, metrics_port=free_port(), max_concurrent_analyses=3
    )
    before = samples(scrape_text(running.metrics_port))
    assert sum(before["histohelper_patches_classified_total"].values()) == 0
    events = analyze(running.target)
    n_patches = sum(len(e.patches.patch_index) for e in events if e.HasField("patches"))
    assert n_patches > 0
    assert analyze_error(running.target, MISSING) == grpc.StatusCode.NOT_FOUND

    values = samples(scrape_text(running.metrics_port))
    assert call_count(values, "AnalyzeSlide", "OK") == 1
    assert call_count(values, "AnalyzeSlide", "NOT_FOUND", "SLIDE_NOT_FOUND") == 1
    manifest = running.worker.runtime.manifest
    # One series per loaded model version (a model repository may hold several).
    assert values["histohelper_patches_classified_total"] == {
        (("model", manifest.model_name), ("version", manifest.model_version)): n_patches
    }
    served = (("model", manifest.model_name), ("version", manifest.model_version))
    assert values["histohelper_slide_seconds_count"] == {served: 1}  # OK calls only
    assert values["histohelper_slide_seconds_sum"][served] > 0
    stage_counts = {
        dict(k)["stage"]: v for k, v in values["histohelper_stage_seconds_count"].items()
    }
    assert stage_counts["tiling"] == 1  # the missing slide never reached the tiler
    assert stage_counts["mil"] == 1
    assert stage_counts["read"] >= 1 and stage_counts["model_batch"] >= 1
    assert set(stage_counts) == set(STAGES)
    # Nothing in flight once the calls ended; every slot free again.
    assert values["histohelper_analyses_in_flight"][()] == 0
    assert values["histohelper_analyses_queued"][()] == 0
    free = {dict(k)["pool"]: v for k, v in values["histohelper_slots_free"].items()}
    assert free["analysis"] == 3 and set(free) == {"analysis", "classify", "upload"}
    cache = {dict(k)["result"]: v for k, v in values["histohelper_cache_requests_total"].items()}
    assert set(cache) == {"hit", "miss"}
    ((labels, info),) = values["histohelper_model_info"].items()
    manifest = running.worker.runtime.manifest
    assert info == 1
    assert dict(labels) == {
        "name": manifest.model_name,
        "version": manifest.model_version,
        "engine": running.worker.runtime.engine,
        "precision": "fp32",
        "untrained": "true" if manifest.untrained else "false",
    }


def test_servers_in_one_process_keep_their_own_counts_and_stop_closes_the_port(
    start_inprocess_server, slide_root: Path
) -> None:
    first = start_inprocess_server(slide_root=slide_root, metrics_port=free_port())
    second = start_inprocess_server(slide_root=slide_root, metrics_port=free_port())
    assert analyze_error(first.target) == grpc.StatusCode.NOT_FOUND
    assert (
        call_count(
            samples(scrape_text(first.metrics_port)), "AnalyzeSlide", "NOT_FOUND", "SLIDE_NOT_FOUND"
        )
        == 1
    )
    assert CALLS not in samples(scrape_text(second.metrics_port))
    port = first.metrics_port
    first.stop(grace=0, drain=0)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_metrics_are_off_by_default(start_inprocess_server, slide_root: Path) -> None:
    running = start_inprocess_server(slide_root=slide_root)
    assert running.metrics is None and running.metrics_port == 0


def test_a_non_loopback_metrics_host_is_logged_as_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    metrics = ServerMetrics()
    with caplog.at_level(logging.WARNING, logger="histohelper.server.metrics"):
        metrics.serve("0.0.0.0", free_port())
    try:
        assert any("non-loopback" in r.getMessage() for r in caplog.records)
        assert "histohelper_calls" in scrape_text(metrics.port)
    finally:
        metrics.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="histohelper.server.metrics"):
        metrics.serve("127.0.0.1", free_port())
    metrics.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_result_cache_lookups_are_counted_and_a_hit_classifies_no_patch(
    start_inprocess_server, slide_root: Path, tmp_path: Path
) -> None:
    running = start_inprocess_server(
        slide_root=slide_root, metrics_port=free_port(), cache_dir=tmp_path / "cache"
    )
    analyze(running.target)
    first = samples(scrape_text(running.metrics_port))
    analyze(running.target)
    second = samples(scrape_text(running.metrics_port))
    cache = {dict(k)["result"]: v for k, v in second["histohelper_cache_requests_total"].items()}
    assert cache == {"hit": 1, "miss": 1}
    patches = "histohelper_patches_classified_total"
    assert sum(second[patches].values()) == sum(first[patches].values()) > 0  # no model batch
    assert call_count(second, "AnalyzeSlide", "OK") == 2
