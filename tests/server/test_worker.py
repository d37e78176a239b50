"""The model worker: runtime.concurrency threads own the model; warm-up runs the serving
batch sizes."""

from __future__ import annotations

from histohelper.server.worker import ModelWorker


class _Recording:
    """A real runtime that records the batch shapes it was given."""

    def __init__(self, runtime: object) -> None:
        self._rt = runtime
        self.manifest = runtime.manifest  # type: ignore[attr-defined]
        self.concurrency = 1
        self.shapes: list[tuple[int, ...]] = []
        self.bags: list[tuple[int, ...]] = []

    def predict_patches(self, images, *, want_cams=False):  # type: ignore[no-untyped-def]
        self.shapes.append(images.shape)
        return self._rt.predict_patches(images, want_cams=want_cams)  # type: ignore[attr-defined]

    def aggregate(self, embeddings):  # type: ignore[no-untyped-def]
        self.bags.append(embeddings.shape)
        return self._rt.aggregate(embeddings)  # type: ignore[attr-defined]


def test_warm_up_runs_each_batch_size_once_on_the_worker(served_runtime) -> None:
    rt = _Recording(served_runtime)
    worker = ModelWorker(rt)  # type: ignore[arg-type]
    try:
        seconds = worker.warm_up((8, 4, 8)).result(timeout=120)
        side = rt.manifest.patch_size_px
        assert rt.shapes == [(8, side, side, 3), (4, side, side, 3)]
        assert rt.bags == [(2, rt.manifest.embedding_dim)]
        assert seconds > 0 and worker.jobs_done == 1
    finally:
        worker.close()


def test_worker_runs_runtime_concurrency_jobs_at_once(served_runtime) -> None:
    """Two jobs that each wait for the other finish only when two threads run them."""
    import threading

    rt = _Recording(served_runtime)
    rt.concurrency = 2
    worker = ModelWorker(rt)  # type: ignore[arg-type]
    try:
        assert worker.concurrency == 2
        meet = threading.Barrier(2, timeout=30)
        futures = [worker.call(meet.wait) for _ in range(2)]
        assert sorted(f.result(timeout=60) for f in futures) == [0, 1]
        assert worker.jobs_done == 2
    finally:
        worker.close()


def test_a_model_failing_its_warm_up_is_a_model_artifact_error(
    served_runtime, model_artifact, slides_dir, monkeypatch
) -> None:
    """The server does not start on a model that cannot run a batch, and says so."""
    import threading

    import pytest

    from histohelper.errors import ModelArtifactError
    from histohelper.server import app, models
    from histohelper.server.config import ServerConfig

    class _Broken(_Recording):
        def predict_patches(self, images, *, want_cams=False):  # type: ignore[no-untyped-def]
            raise RuntimeError("engine exploded")

    monkeypatch.setattr(models, "load_runtime", lambda *a, **k: _Broken(served_runtime))
    before = set(threading.enumerate())
    config = ServerConfig(model_path=model_artifact, slide_root=slides_dir, port=0)
    with pytest.raises(ModelArtifactError, match="warm-up"):
        app.start_server(config)
    new = [t for t in threading.enumerate() if t not in before]
    assert not [t for t in new if t.name.startswith("model-worker")]
