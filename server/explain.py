"""Explanations of chosen patches: the patch image and its Grad-CAM map.

For ResNet18's global-average-pool + linear head, Grad-CAM (Selvaraju et al., ICCV
2017) at layer4 has a closed form: the gradient of logit c with respect to feature
map A^k is w_ck / (h * w) everywhere, so its channel weights are alpha_k = w_ck / (h*w)
and Grad-CAM_c = ReLU(sum_k w_ck A^k) / (h * w) = ReLU(CAM_c) / (h * w), where CAM_c
is the class activation map of Zhou et al. (CVPR 2016) that the artifact returns. No
autograd is needed at serving time; tests/explain proves the equality against autograd
Grad-CAM on the eager torchvision model.

Free of gRPC: :class:`Explainer` yields :class:`Explanation` objects.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.errors import InvalidOptionsError
from histohelper.server.pipeline import (
    AnalysisSpec,
    Analyzer,
    AttentionDone,
    PatchesDone,
)
from histohelper.server.runtime import PatchOutput
from histohelper.server.stage import Predicted, predict_in_order
from histohelper.server.tiling import PatchBatch, PatchReader, TilingPlan
from histohelper.server.tiling.stain import AppliedStain, StainNormalizer

MAX_EXPLAINED = 256


@dataclass(frozen=True)
class Selection:
    """Which patches to explain.

    Attributes:
        kind: "indices" (explicit bag indices) or "top_k".
        indices: bag indices for kind "indices".
        k: number of patches for kind "top_k".
        rank_by: "attention" or "probability" (of the explained class) for "top_k".
    """

    kind: Literal["indices", "top_k"]
    indices: tuple[int, ...] = ()
    k: int = 0
    rank_by: Literal["attention", "probability"] = "attention"


@dataclass(frozen=True)
class Explanation:
    """One explained patch.

    Attributes:
        index: bag index into ``plan.grid``.
        rank: position in the selection (0 = highest score; input order for indices).
        score: the ranking score (attention or probability; probability for indices).
        image: uint8 [S, S, 3] RGB patch as the model saw it.
        probabilities: float32 [C] softmax over patch classes.
        attention: MIL attention weight, or None when not computed.
        class_index: the explained class.
        grad_cam: float32 [h, w] Grad-CAM of that class at layer4, >= 0, not normalised.
    """

    index: int
    rank: int
    score: float
    image: npt.NDArray[np.uint8]
    probabilities: npt.NDArray[np.float32]
    attention: float | None
    class_index: int
    grad_cam: npt.NDArray[np.float32]


def grad_cam_from_cams(cams: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Grad-CAM at layer4 from class activation maps, for a GAP + linear head.

    Args:
        cams: float32 [..., h, w] class activation maps (fc-weighted layer4 features).

    Returns:
        float32 [..., h, w]: ReLU(cams) / (h * w) (Selvaraju et al., ICCV 2017, with the
        closed-form gradient of a GAP + linear head).
    """
    h, w = cams.shape[-2:]
    return (np.maximum(cams, 0.0) / float(h * w)).astype(np.float32)


def encode_jpeg(image: npt.NDArray[np.uint8], quality: int = 90) -> bytes:
    """JPEG bytes of an RGB uint8 [h, w, 3] image (OpenCV ``imencode``)."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise InvalidOptionsError("could not encode the patch as JPEG")
    return buf.tobytes()


class Explainer:
    """Chooses patches of a slide and computes their Grad-CAM maps.

    Args:
        analyzer: the analysis pipeline (its worker runs the model).
    """

    def __init__(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer

    def _rank(
        self, spec: AnalysisSpec, plan: TilingPlan, selection: Selection, class_index: int,
        stop: threading.Event,
    ) -> tuple[list[int], list[float], dict[int, float]]:  # fmt: skip
        """Run the whole analysis and return the top-k indices, scores, attention."""
        n = len(plan.grid)
        probs = np.full(n, -np.inf, np.float32)
        attention = np.full(n, -np.inf, np.float32)
        full = AnalysisSpec(
            request_id=spec.request_id,
            slide_path=spec.slide_path,
            tiling=spec.tiling,
            batch_size=spec.batch_size,
            return_attention=True,
            stain=spec.stain,
        )
        for event in self.analyzer.run(full, stop, plan=plan):
            if isinstance(event, PatchesDone) and len(event.indices):
                probs[event.indices] = event.probabilities[:, class_index]
            elif isinstance(event, AttentionDone):
                attention[event.indices] = event.attention
        scores = attention if selection.rank_by == "attention" else probs
        valid = np.flatnonzero(np.isfinite(scores))
        order = valid[np.argsort(-scores[valid], kind="stable")][: selection.k]
        att = {int(i): float(attention[i]) for i in order if np.isfinite(attention[i])}
        return [int(i) for i in order], [float(scores[i]) for i in order], att

    def explain(
        self,
        spec: AnalysisSpec,
        selection: Selection,
        class_index: int,
        stop: threading.Event,
    ) -> tuple[TilingPlan, AppliedStain, Iterator[Explanation]]:
        """Plan the slide, choose patches, and return the plan, the stain
        normalisation applied to the explained images, and a lazy iterator.

        Args:
            spec: the slide and tiling options (as for AnalyzeSlide).
            selection: explicit bag indices, or top k by attention/probability.
            class_index: patch class to explain.
            stop: set to cancel.

        Returns:
            The tiling plan, the applied stain normalisation (fitted on the plan's
            tissue pixels as :meth:`Analyzer.run` fits it, so the images are what the
            model saw in the analysis) and an iterator of explanations in rank order.

        Raises:
            InvalidOptionsError: k or indices out of range, too many patches.
            SlideError subclasses from tiling and reading.
        """
        plan = self.analyzer.plan(spec, stop)
        # The same stain normalisation as the analysis (the fit is deterministic).
        normalizer, applied, _ = self.analyzer.fit_stain(spec, plan)
        n = len(plan.grid)
        attention: dict[int, float] = {}
        if selection.kind == "indices":
            if not selection.indices:
                raise InvalidOptionsError("no patch indices to explain")
            if len(selection.indices) > MAX_EXPLAINED:
                raise InvalidOptionsError(f"at most {MAX_EXPLAINED} patches per request")
            bad = [i for i in selection.indices if not 0 <= i < n]
            if bad:
                raise InvalidOptionsError(
                    f"patch index {bad[0]} is outside the bag (0 .. {n - 1})"
                    if n
                    else "the slide has no tissue patches to explain"
                )
            indices = list(selection.indices)
            scores: list[float] = []
        else:
            if not 1 <= selection.k <= MAX_EXPLAINED:
                raise InvalidOptionsError(f"top_k.k must be in [1, {MAX_EXPLAINED}]")
            if n == 0:
                return plan, applied, iter(())
            indices, scores, attention = self._rank(spec, plan, selection, class_index, stop)
        return (
            plan,
            applied,
            self._explain_indices(
                spec, plan, normalizer, indices, scores, attention, class_index, stop
            ),
        )

    def _explain_indices(
        self,
        spec: AnalysisSpec,
        plan: TilingPlan,
        normalizer: StainNormalizer | None,
        indices: Sequence[int],
        scores: Sequence[float],
        attention: dict[int, float],
        class_index: int,
        stop: threading.Event,
    ) -> Iterator[Explanation]:
        rank_of = {idx: r for r, idx in enumerate(indices)}
        model_px = self.analyzer.worker.runtime.manifest.patch_size_px
        results: dict[int, Explanation] = {}
        reader = PatchReader(
            spec.slide_path,
            plan.grid,
            batch_size=min(spec.batch_size, 32),
            num_workers=self.analyzer.num_readers,
            max_failed_fraction=1.0,
            cache=self.analyzer.slide_cache,
            output_size_px=model_px,  # each read resized once, straight to the model input
            transform=normalizer,
        )
        worker = self.analyzer.worker
        stage = predict_in_order(
            worker,
            reader.iter_batches(indices=sorted(set(indices)), stop=stop),
            lambda batch: batch.images,
            # One batch per model-worker thread in flight: an OpenVINO call runs on one
            # stream (its share of the cores), so one call at a time would idle the rest.
            depth=worker.concurrency,
            stop=stop,
            want_cams=True,
        )
        try:
            for item in stage:
                assert isinstance(item, Predicted)
                if item.output is None:  # none of the batch's patches could be read
                    continue
                results.update(
                    self._explained(
                        item.batch, item.output, rank_of, scores, attention, class_index
                    )
                )
        finally:
            stage.close()
        for idx in indices:
            if stop.is_set():
                return
            if idx in results:
                yield results.pop(idx)

    @staticmethod
    def _explained(
        batch: PatchBatch,
        out: PatchOutput,
        rank_of: dict[int, int],
        scores: Sequence[float],
        attention: dict[int, float],
        class_index: int,
    ) -> dict[int, Explanation]:
        """The explanations of one batch's patches, by bag index."""
        assert out.cams is not None
        cams = grad_cam_from_cams(out.cams[:, class_index])
        explained: dict[int, Explanation] = {}
        for j, idx in enumerate(batch.indices.tolist()):
            rank = rank_of[idx]
            prob = out.probabilities[j]
            explained[idx] = Explanation(
                index=idx,
                rank=rank,
                score=scores[rank] if scores else float(prob[class_index]),
                image=batch.images[j],
                probabilities=prob,
                attention=attention.get(idx),
                class_index=class_index,
                grad_cam=cams[j],
            )
        return explained
