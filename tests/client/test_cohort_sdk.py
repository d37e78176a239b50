"""``analyze_many`` (sync iterator and async generator) over a real in-process server
whose slide root holds small synthetic slides; SERVER_BUSY retried with backoff."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from cohort_support import audit_records, write_corrupt_slide, write_small_slide

from histohelper.client import AnalysisOptions, AsyncSlideClient, SlideClient
from histohelper.client.cohort import Backoff, CohortProgress, CohortSlide, SlideOutcome
from histohelper.errors import CorruptSlideError, SlideNotFoundError

FAST = Backoff(base_s=0.05, cap_s=0.2, floor_s=0.0)


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort-sdk-slides")
    for i, name in enumerate(("a", "b", "c")):
        write_small_slide(root / f"{name}.tiff", seed=10 + i)
    write_corrupt_slide(root / "bad.tiff")
    return root


def test_analyze_many_sync_yields_results_and_failures(
    start_inprocess_server, slide_root: Path
) -> None:
    server = start_inprocess_server(slide_root=slide_root)
    slides = ["a.tiff", "missing.tiff", CohortSlide("b.tiff", id="B"), "bad.tiff"]
    events: list[CohortProgress] = []
    with SlideClient(server.target) as client:
        outcomes = list(client.analyze_many(slides, jobs=2, retries=2, on_progress=events.append))
        direct = client.analyze("a.tiff")
    by_index = {o.index: o for o in outcomes}
    assert sorted(by_index) == [0, 1, 2, 3]
    a, missing, b, bad = (by_index[i] for i in range(4))
    assert a.ok and b.ok and a.error is None and b.item.id == "B"
    assert isinstance(missing.error, SlideNotFoundError) and missing.result is None
    assert missing.reason.startswith("SLIDE_NOT_FOUND: ")
    assert isinstance(bad.error, CorruptSlideError) and bad.reason.startswith("SLIDE_CORRUPT")
    assert missing.attempts == 1 and bad.attempts == 1  # not retried
    assert a.result is not None
    np.testing.assert_array_equal(a.result.patches.probabilities, direct.patches.probabilities)
    assert a.result.patch_count == direct.patch_count > 0
    finished = [e.index for e in events if e.kind == "finished"]
    assert sorted(finished) == [0, 1, 2, 3]
    assert any(e.kind == "patches" and e.patches_total > 0 for e in events)


def test_analyze_many_async_generator(start_inprocess_server, slide_root: Path) -> None:
    server = start_inprocess_server(slide_root=slide_root)
    options = AnalysisOptions(min_tissue_fraction=0.9)
    own = AnalysisOptions(min_tissue_fraction=0.1)

    async def main() -> list[SlideOutcome]:
        async with AsyncSlideClient(server.target) as client:
            return [
                o
                async for o in client.analyze_many(
                    ["a.tiff", CohortSlide("c.tiff", options=own), "nope.tiff"],
                    options,
                    jobs=3,
                )
            ]

    outcomes = sorted(asyncio.run(main()), key=lambda o: o.index)
    assert [o.ok for o in outcomes] == [True, True, False]
    assert outcomes[0].options == options and outcomes[1].options == own
    assert outcomes[0].result is not None and outcomes[1].result is not None
    assert outcomes[0].result.grid.min_tissue_fraction == pytest.approx(0.9)
    assert outcomes[1].result.grid.min_tissue_fraction == pytest.approx(0.1)
    assert isinstance(outcomes[2].error, SlideNotFoundError)


def test_server_busy_is_retried_with_backoff(
    start_inprocess_server, slide_root: Path, tmp_path: Path
) -> None:
    """One analysis slot and three slides sent at once: the others get SERVER_BUSY,
    back off and retry until every slide is done."""
    audit = tmp_path / "audit.jsonl"
    server = start_inprocess_server(
        slide_root=slide_root, max_concurrent_analyses=1, audit_log=audit
    )
    retries: list[CohortProgress] = []

    def on_progress(event: CohortProgress) -> None:
        if event.kind == "retry":
            retries.append(event)

    with SlideClient(server.target) as client:
        outcomes = list(
            client.analyze_many(
                ["a.tiff", "b.tiff", "c.tiff"],
                jobs=3,
                retries=50,
                backoff=FAST,
                on_progress=on_progress,
            )
        )
    assert all(o.ok for o in outcomes), [o.reason for o in outcomes]
    busy = [r for r in audit_records(audit) if r["reason"] == "SERVER_BUSY"]
    assert busy, "no call was refused: the test did not exercise a retry"
    assert sum(o.attempts - 1 for o in outcomes) == len(busy) == len(retries)
    assert all(type(r.error).__name__ == "ServerBusyError" for r in retries)
    assert all(0.0 <= r.delay_s <= FAST.cap_s for r in retries)
    assert len(audit_records(audit)) == 3 + len(busy)


def test_retries_are_bounded(start_inprocess_server, slide_root: Path) -> None:
    """With retries=0 a busy server fails the slide with SERVER_BUSY, the rest complete."""
    server = start_inprocess_server(slide_root=slide_root, max_concurrent_analyses=1)
    with SlideClient(server.target) as client:
        outcomes = list(client.analyze_many(["a.tiff", "b.tiff", "c.tiff"], jobs=3, retries=0))
    failed = [o for o in outcomes if not o.ok]
    assert any(o.ok for o in outcomes)
    assert failed and all(o.reason.startswith("SERVER_BUSY") for o in failed)
    assert all(o.attempts == 1 for o in outcomes)


def test_backoff_is_full_jitter_under_the_cap() -> None:
    import random

    rng = random.Random(0)
    b = Backoff(base_s=1.0, cap_s=5.0, floor_s=0.0)
    draws = {n: [b.delay_s(n, rng) for _ in range(200)] for n in (1, 2, 3, 6)}
    assert max(draws[1]) <= 1.0 and max(draws[2]) <= 2.0 and max(draws[6]) <= 5.0
    assert max(draws[6]) > 2.5  # the ceiling grows with the retry number
    assert min(draws[3]) < 0.5  # full jitter: down to zero
    with pytest.raises(ValueError):
        Backoff(base_s=2.0, cap_s=1.0)


def test_analyze_many_refuses_bad_arguments(start_inprocess_server, slide_root: Path) -> None:
    server = start_inprocess_server(slide_root=slide_root)
    with SlideClient(server.target) as client:
        with pytest.raises(ValueError, match="jobs"):
            list(client.analyze_many(["a.tiff"], jobs=0))
        with pytest.raises(ValueError, match="retries"):
            list(client.analyze_many(["a.tiff"], retries=-1))
        assert list(client.analyze_many([])) == []
        # Closing the iterator early cancels what is in flight and returns.
        it = client.analyze_many(["a.tiff", "b.tiff", "c.tiff"], jobs=1)
        first = next(it)
        it.close()
        assert first.ok


def test_server_stopped_mid_stream_is_retried_on_the_other(
    start_inprocess_server, tmp_path: Path
) -> None:
    """Two servers (round_robin): the one analysing the slide is stopped as its first
    progress arrives; the stream ends UNAVAILABLE and the retry completes on the other."""
    audits = [tmp_path / "audit0.jsonl", tmp_path / "audit1.jsonl"]
    servers = [start_inprocess_server(audit_log=a) for a in audits]
    stopped: list[int] = []

    def on_progress(event: CohortProgress) -> None:
        if event.kind == "patches" and event.attempt == 1 and not stopped:
            busy = [i for i, s in enumerate(servers) if s.call_path.pools["analysis"].in_use]
            stopped.extend(busy)
            for i in busy:
                threading.Thread(target=servers[i].stop, kwargs={"grace": 0, "drain": 0}).start()

    with SlideClient([s.target for s in servers]) as client:
        (outcome,) = client.analyze_many(
            ["real/CMU-1-Small-Region.svs"], jobs=1, backoff=FAST, on_progress=on_progress
        )
    assert len(stopped) == 1
    assert outcome.ok, outcome.reason
    assert outcome.attempts == 2
    other = 1 - stopped[0]
    done = [r for r in audit_records(audits[other]) if r["outcome"] == "OK"]
    assert len(done) == 1 and done[0]["request_id"] == outcome.result.request_id


def test_analyze_many_model_is_the_default_of_slides_naming_none(
    slide_root: Path, tmp_path: Path, model_artifact: Path, model_artifact_v2: Path
) -> None:
    """A repository serving tumour:1 and tumour:2 (default 2): ``model=`` picks the
    version of every slide without its own ``CohortSlide.model``, sync and async;
    without it the server's default serves; a malformed one is refused up front."""
    from histohelper.client.models import ModelRef
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    repo = tmp_path / "repo"
    for version, artifact in (("1", model_artifact), ("2", model_artifact_v2)):
        (repo / "tumour" / version).mkdir(parents=True)
        (repo / "tumour" / version / "model.pt").symlink_to(artifact)
    (repo / "tumour" / "model.json").write_text('{"version_policy": "all"}')
    config = ServerConfig(
        model_repository=repo, slide_root=slide_root, port=0, precision="fp32", grace_s=2.0
    )
    running = start_server(config)
    slides = ["a.tiff", CohortSlide("b.tiff", model="tumour:2")]

    def versions(outcomes: list[SlideOutcome]) -> list[str]:
        assert all(o.ok for o in outcomes), [o.reason for o in outcomes]
        return [o.result.model.version for o in sorted(outcomes, key=lambda o: o.index)]  # type: ignore[union-attr]

    async def run_async() -> list[SlideOutcome]:
        async with AsyncSlideClient(running.target) as client:
            many = client.analyze_many(slides, jobs=2, model=ModelRef("tumour", "1"))
            return [o async for o in many]

    try:
        with SlideClient(running.target) as client:
            assert versions(list(client.analyze_many(slides, jobs=2, model="tumour:1"))) == [
                "1",
                "2",
            ]
            assert versions(list(client.analyze_many(slides, jobs=2))) == ["2", "2"]
            with pytest.raises(ValueError, match="NAME"):
                list(client.analyze_many(slides, model="tumour:1:x"))
        assert versions(asyncio.run(run_async())) == ["1", "2"]
    finally:
        running.stop(grace=0, drain=0)
