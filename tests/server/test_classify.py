"""Classifier (ClassifyPatches' domain) against a real loaded runtime, without gRPC;
the decoded-pixel budget (issue 16, finding 6)."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from histohelper.errors import (
    InvalidOptionsError,
    PixelBudgetExceededError,
    error_class_for,
)
from histohelper.server.classify import Classifier, decode_patch_image
from histohelper.server.images import PixelBudget, patch_px
from histohelper.server.worker import ModelWorker
from histohelper.v1 import slide_analysis_pb2 as pb

MPX = 1024 * 1024


@pytest.fixture(scope="module")
def worker(served_runtime):
    w = ModelWorker(served_runtime)
    yield w
    w.close()


def _classifier(worker: ModelWorker, **kw: int) -> Classifier:
    args = {
        "batch_size": 4,
        "max_images_per_request": 16,
        "request_max_px": 128 * MPX,
        "stream_max_px": 4096 * MPX,
    }
    args.update(kw)
    return Classifier(worker, **args)


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _images(n: int, side: int = 96) -> list[pb.PatchImage]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        rgb = rng.integers(0, 256, (side, side + 8 * i, 3), dtype=np.uint8)
        if i % 2:
            out.append(pb.PatchImage(id=f"p{i}", encoded=_png(rgb)))
        else:
            raw = pb.RawImage(width_px=rgb.shape[1], height_px=rgb.shape[0], rgb=rgb.tobytes())
            out.append(pb.PatchImage(id=f"p{i}", raw=raw))
    return out


def _classify(classifier: Classifier, images, budget=None, stop=None, embeddings=True):
    return classifier.classify(
        images,
        return_embeddings=embeddings,
        stream_budget=budget or classifier.stream_budget(),
        stop=stop or threading.Event(),
    )


def test_predictions_equal_the_model_on_the_decoded_images(worker: ModelWorker) -> None:
    classifier = _classifier(worker, batch_size=3)
    images = _images(7)
    got = _classify(classifier, images)
    assert [p.id for p in got] == [f"p{i}" for i in range(7)]
    size = worker.runtime.manifest.patch_size_px
    decoded = [decode_patch_image(im, size) for im in images]
    for start in range(0, 7, 3):  # the classifier's batches: 3, 3, 1
        want = worker.predict_patches(np.stack(decoded[start : start + 3])).result()
        for j, p in enumerate(got[start : start + 3]):
            assert p.error is None
            np.testing.assert_array_equal(p.logits, want.logits[j])
            np.testing.assert_array_equal(p.probabilities, want.probabilities[j])
            np.testing.assert_array_equal(p.embedding, want.embeddings[j])
            assert p.probabilities.dtype == np.float32


def test_a_bad_image_gets_its_error_and_the_others_classify(worker: ModelWorker) -> None:
    images = _images(3)
    images.insert(1, pb.PatchImage(id="bad", encoded=b"GIF89a not an accepted format"))
    images.append(pb.PatchImage(id="truncated", encoded=_png(np.zeros((64, 64, 3), np.uint8))[:60]))
    got = _classify(_classifier(worker), images, embeddings=False)
    assert [p.id for p in got] == ["p0", "bad", "p1", "p2", "truncated"]
    assert got[1].error and "PNG, JPEG or TIFF" in got[1].error and got[1].logits is None
    assert got[4].error and got[4].probabilities is None
    for p in (got[0], got[2], got[3]):
        assert p.error is None and p.probabilities.shape == p.logits.shape
        assert p.embedding is None


def test_too_many_images_is_invalid_options(worker: ModelWorker) -> None:
    with pytest.raises(InvalidOptionsError, match="at most 2 images"):
        _classify(_classifier(worker, max_images_per_request=2), _images(3))


def test_the_request_budget_is_charged_before_decoding(
    worker: ModelWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finding's request: 64 black 8192 x 8192 px PNGs (12.5 MB, 4.3 Gpx decoded).
    It is refused from the headers: not one image is decoded, no model call runs."""
    black = _png(np.zeros((8192, 8192, 3), np.uint8))
    images = [pb.PatchImage(id=str(i), encoded=black) for i in range(64)]
    decodes = 0
    real_imdecode = cv2.imdecode

    def counting_imdecode(*args, **kwargs):
        nonlocal decodes
        decodes += 1
        return real_imdecode(*args, **kwargs)

    monkeypatch.setattr(cv2, "imdecode", counting_imdecode)
    classifier = _classifier(worker, max_images_per_request=64)
    budget = classifier.stream_budget()
    jobs = worker.jobs_done
    with pytest.raises(PixelBudgetExceededError, match="134217728 px") as info:
        _classify(classifier, images, budget)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert info.value.metadata["budget"] == "request"
    assert decodes == 0 and worker.jobs_done == jobs
    assert budget.used_px == 0  # a refused request costs the stream nothing


def test_the_stream_budget_spans_requests(worker: ModelWorker) -> None:
    images = _images(2, side=512)  # 2 x ~0.27 Mpx
    px = sum(patch_px(im) for im in images)
    classifier = _classifier(worker, stream_max_px=int(px * 1.5))
    budget = classifier.stream_budget()
    first = _classify(classifier, images, budget)
    assert all(p.error is None for p in first) and budget.used_px == px
    with pytest.raises(PixelBudgetExceededError) as info:
        _classify(classifier, images, budget)
    assert info.value.metadata["budget"] == "stream"
    assert _classify(classifier, images)  # another stream has its own budget


def test_stop_returns_none(worker: ModelWorker) -> None:
    stop = threading.Event()
    stop.set()
    assert _classify(_classifier(worker), _images(3), stop=stop) is None


def test_pixel_budget_counts_only_what_fits() -> None:
    budget = PixelBudget(100, "request")
    budget.charge(60)
    with pytest.raises(
        PixelBudgetExceededError, match="100 px allowed per ClassifyPatches request"
    ):
        budget.charge(41)
    budget.charge(40)
    assert budget.used_px == 100


def test_the_client_maps_the_reason_back() -> None:
    cls = error_class_for("PIXEL_BUDGET_EXCEEDED", "RESOURCE_EXHAUSTED")
    assert cls is PixelBudgetExceededError
