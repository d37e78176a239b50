"""The read -> predict stage: order, bounded depth, cancellation, over a real model."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from histohelper.server.stage import Predicted, predict_in_order
from histohelper.server.worker import ModelWorker


@pytest.fixture(scope="module")
def worker(served_runtime):
    w = ModelWorker(served_runtime)
    yield w
    w.close()


def _batches(worker: ModelWorker, sizes: list[int]) -> list[np.ndarray]:
    side = worker.runtime.manifest.patch_size_px
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8) for n in sizes]


def test_results_come_in_order_and_equal_direct_calls(worker: ModelWorker) -> None:
    batches = _batches(worker, [3, 0, 5, 2])
    items = list(predict_in_order(worker, batches, lambda b: b, depth=2, stop=threading.Event()))
    assert [it.batch is b for it, b in zip(items, batches, strict=True)] == [True] * 4
    assert items[1].output is None  # an empty batch never reaches the model
    for item in items:
        if len(item.batch):
            want = worker.predict_patches(item.batch).result()
            np.testing.assert_array_equal(item.output.probabilities, want.probabilities)
            np.testing.assert_array_equal(item.output.embeddings, want.embeddings)


@pytest.mark.parametrize("depth", [1, 2, 3], ids=["depth1", "depth2", "depth3"])
def test_at_most_depth_batches_are_taken_ahead(worker: ModelWorker, depth: int) -> None:
    """The source is pulled only while fewer than ``depth`` calls are in flight."""
    batches = _batches(worker, [1] * 6)
    taken = 0

    def source() -> Iterator[np.ndarray]:
        nonlocal taken
        for b in batches:
            taken += 1
            yield b

    seen = 0
    for item in predict_in_order(
        worker, source(), lambda b: b, depth=depth, stop=threading.Event()
    ):
        assert isinstance(item, Predicted)
        seen += 1
        assert taken <= seen + depth - 1 or taken == len(batches)
    assert seen == len(batches)


def test_submits_are_reported_before_results(worker: ModelWorker) -> None:
    batches = _batches(worker, [2, 2])
    kinds = [
        type(it).__name__
        for it in predict_in_order(
            worker, batches, lambda b: b, depth=2, stop=threading.Event(), report_submits=True
        )
    ]
    assert kinds == ["Submitted", "Submitted", "Predicted", "Predicted"]


def test_stop_ends_the_stage_and_closes_the_source(worker: ModelWorker) -> None:
    stop = threading.Event()
    closed = threading.Event()
    batches = _batches(worker, [1] * 5)

    def source() -> Iterator[np.ndarray]:
        try:
            yield from batches
        finally:
            closed.set()

    out = []
    for item in predict_in_order(worker, source(), lambda b: b, depth=2, stop=stop):
        out.append(item)
        stop.set()
    assert len(out) == 1 and closed.is_set()


def test_closing_early_cancels_queued_calls(served_runtime) -> None:
    """Calls still queued at the worker when the consumer leaves are never run."""
    gate = threading.Event()
    worker = ModelWorker(served_runtime)
    try:
        blocker = worker.call(gate.wait)  # holds the only model thread
        batches = _batches(worker, [1, 1, 1])
        it = predict_in_order(
            worker, batches, lambda b: b, depth=3, stop=threading.Event(), report_submits=True
        )
        assert [type(next(it)).__name__ for _ in range(3)] == ["Submitted"] * 3
        before = worker.jobs_done
        it.close()
        gate.set()
        blocker.result()
        worker.call(lambda: None).result()  # runs after every queued job was skipped
        assert worker.jobs_done == before + 2  # the blocker and the probe only
    finally:
        gate.set()
        worker.close()


def test_a_model_error_reaches_the_consumer(served_runtime) -> None:
    worker = ModelWorker(served_runtime)
    try:
        side = worker.runtime.manifest.patch_size_px
        bad = np.zeros((1, side + 1, 3), dtype=np.uint8)  # wrong rank: the model raises
        batches = [bad, *_batches(worker, [1, 1])]
        with pytest.raises(Exception):  # noqa: B017 - whatever the runtime raises
            list(predict_in_order(worker, batches, lambda b: b, depth=3, stop=threading.Event()))
    finally:
        worker.close()
