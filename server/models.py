"""What one loaded model version serves with: runtime, model worker, analyzer,
classifier, explainer and result-cache view, built together and closed together.

:class:`ModelBuilder` is the ``build`` callable of
:class:`~histohelper.server.repository.ModelRepository`: it loads an artifact with the
server's device, precision and backend (the runtime applies the artifact's manifest
and parity gates), warms it up on one batch of each size the server will use, and
assembles the domain parts. Each version has its own :class:`ModelWorker`, so two
versions never share a device queue and one can be closed while another serves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from histohelper.errors import ModelArtifactError
from histohelper.server import convert
from histohelper.server.cache import AnalysisCache, ResultCache, model_identity
from histohelper.server.classify import Classifier
from histohelper.server.config import ServerConfig
from histohelper.server.explain import Explainer
from histohelper.server.observe import NULL_OBSERVER, Observer
from histohelper.server.pipeline import FIRST_BATCH_SIZE, Analyzer
from histohelper.server.runtime import ModelRuntime, load_runtime
from histohelper.server.tiling import SlideCache
from histohelper.server.worker import ModelWorker
from histohelper.v1 import slide_analysis_pb2 as pb

log = logging.getLogger(__name__)


def load_worker(
    config: ServerConfig,
    path: Path,
    runtime: ModelRuntime | None = None,
    observer: Observer = NULL_OBSERVER,
) -> ModelWorker:
    """The model's worker (reporting to ``observer``); a model loaded here (``runtime``
    None) is loaded from ``path`` and warmed up first.

    Raises:
        ModelArtifactError: the artifact cannot be loaded, fails the runtime's gates, or
            fails its warm-up batches.
    """
    warm = runtime is None
    if runtime is None:
        runtime = load_runtime(
            path,
            device=config.device,
            precision=config.precision,
            num_threads=config.num_threads,
            backend=config.backend,
        )
    worker = ModelWorker(runtime, observer=observer)
    if warm:
        sizes = (min(FIRST_BATCH_SIZE, config.batch_size), config.batch_size)
        try:
            warm_s = worker.warm_up(sizes).result()
        except Exception as exc:  # any engine error: the model cannot serve
            worker.close()
            raise ModelArtifactError(
                f"the model failed its warm-up batch: {type(exc).__name__}"
            ) from exc
        log.info("model warmed up in %.2f s", warm_s)
    return worker


@dataclass(eq=False)
class ServedModel:
    """One loaded model version's parts.

    Attributes:
        name, version: the repository's names of the version (for ``--model FILE``:
            the manifest's model name and version).
        artifact_sha256: SHA-256 of the artifact file (64 lowercase hex digits).
        runtime: the loaded model (read for its manifest; calls go through ``worker``).
        worker: the version's one device owner.
        analyzer, classifier, explainer: the domain parts over ``worker``.
        cache: the result cache keyed on this version's artifact (None: off).
    """

    name: str
    version: str
    artifact_sha256: str
    runtime: ModelRuntime
    worker: ModelWorker
    analyzer: Analyzer
    classifier: Classifier
    explainer: Explainer
    cache: AnalysisCache | None

    @property
    def label(self) -> str:
        """``name:version`` (audit records, health service names, logs)."""
        return f"{self.name}:{self.version}"

    def ref(self) -> pb.ModelRef:
        """The version as results name it."""
        return pb.ModelRef(name=self.name, version=self.version)

    def summary(self) -> pb.ModelSummary:
        """The version as the API describes it (repository name and version)."""
        summary = convert.model_summary(self.runtime)
        summary.name, summary.version = self.name, self.version
        summary.artifact_sha256 = self.artifact_sha256
        return summary

    def close(self) -> None:
        """Stop the worker after its queued jobs (the runtime goes with the last reference)."""
        self.worker.close()


class ModelBuilder:
    """Builds a :class:`ServedModel` per version (the repository's ``build``).

    Args:
        config: device, precision, backend, batch and reader settings.
        observer: metrics (``for_model`` is used where the observer has it).
        store: the result cache's store (None: off).
        preloaded: runtimes already loaded, by artifact path (tests share one; not
            warmed again).
        slide_cache: OpenSlide handles and tiles shared by every version.
    """

    def __init__(
        self,
        config: ServerConfig,
        observer: Observer = NULL_OBSERVER,
        store: ResultCache | None = None,
        preloaded: dict[Path, ModelRuntime] | None = None,
        slide_cache: SlideCache | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self.store = store
        self.preloaded = dict(preloaded or {})
        self.slide_cache = slide_cache or SlideCache()

    def __call__(self, name: str, version: str, path: Path) -> ServedModel:
        """Load, warm and assemble ``path`` as ``name``/``version``.

        Raises:
            ModelArtifactError: as :func:`load_worker`.
        """
        config = self.config
        for_model = getattr(self.observer, "for_model", None)
        observer = for_model(name, version) if for_model is not None else self.observer
        worker = load_worker(config, path, self.preloaded.get(path), observer)
        try:
            identity = model_identity(worker.runtime, path, worker.concurrency)
        except OSError:
            worker.close()
            raise ModelArtifactError("the model artifact could not be read") from None
        cache = None
        if self.store is not None:
            cache = AnalysisCache(
                self.store, identity, lambda result: self.observer.cache_lookup(result == "hit")
            )
        analyzer = Analyzer(
            worker,
            num_readers=config.num_readers,
            max_patches_per_slide=config.max_patches_per_slide,
            max_failed_fraction=config.max_failed_fraction,
            slide_cache=self.slide_cache,
            observer=observer,
        )
        classifier = Classifier(
            worker,
            batch_size=config.batch_size,
            max_images_per_request=config.max_images_per_request,
            request_max_px=config.classify_request_max_px,
            stream_max_px=config.classify_stream_max_px,
        )
        return ServedModel(
            name,
            version,
            identity.artifact_sha256,
            worker.runtime,
            worker,
            analyzer,
            classifier,
            Explainer(analyzer),
            cache,
        )
