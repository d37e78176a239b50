"""Explanations on the client: Grad-CAM patches, sub-patch heatmaps and the gallery.

- :class:`PatchExplanation`: one patch from ``ExplainPatches`` (JPEG image + Grad-CAM).
- :func:`local_probabilities` / :func:`cell_boxes`: CAMs -> a class probability per CAM
  cell over its exact level-0 box, for sub-patch-resolution heatmaps
  (:meth:`SlideResult.cam_heatmap`).
- :func:`render_gallery`: a grid of top-k patches with their Grad-CAM overlays and
  scores (OpenCV, imported lazily).

Numpy only at import; no torch, no OpenSlide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from histohelper.client.dicomweb import DicomWebSlide, slide_ref
from histohelper.client.options import AnalysisOptions
from histohelper.client.stain import AppliedStain
from histohelper.client.uploads import UploadedSlide
from histohelper.errors import InternalError
from histohelper.v1 import slide_analysis_pb2 as pb

if TYPE_CHECKING:
    from histohelper.client.result import PatchTable


@dataclass(frozen=True, slots=True, eq=False)
class PatchExplanation:
    """One explained patch.

    Attributes:
        patch_index, row, col: bag index and grid position.
        x_l0, y_l0, width_l0, height_l0: the patch's exact level-0 box.
        image_jpeg: the patch as the model saw it (RGB, JPEG).
        class_name: the explained patch class.
        probabilities: float32 ``[C]`` softmax over the patch classes.
        attention: MIL attention weight, or None when the server did not rank by it.
        grad_cam: float32 ``[s, s]`` Grad-CAM at ResNet18 layer4 (>= 0, not normalised).
        rank: 0 = highest score in the selection.
        score: the ranking score (attention or probability).
        class_probability: probability of ``class_name``.
        stain: the stain normalisation applied to ``image_jpeg``
            (``ExplainPatchesResponse.stain``: the same fit as the slide's analysis
            with the same options), or None when the server did not report it.
    """

    patch_index: int
    row: int
    col: int
    x_l0: float
    y_l0: float
    width_l0: float
    height_l0: float
    image_jpeg: bytes = field(repr=False)
    class_name: str
    probabilities: npt.NDArray[np.float32] = field(repr=False)
    attention: float | None
    grad_cam: npt.NDArray[np.float32] = field(repr=False)
    rank: int
    score: float
    class_probability: float
    stain: AppliedStain | None = None

    @classmethod
    def from_response(cls, reply: pb.ExplainPatchesResponse) -> PatchExplanation:
        """The explained patch of one ``ExplainPatchesResponse``, with its stain."""
        stain = AppliedStain.from_proto(reply.stain) if reply.HasField("stain") else None
        return cls.from_proto(reply.explanation, stain)

    @classmethod
    def from_proto(
        cls, msg: pb.PatchExplanation, stain: AppliedStain | None = None
    ) -> PatchExplanation:
        s = msg.cam_size
        if s <= 0 or len(msg.grad_cam) != s * s:
            raise InternalError("PatchExplanation.grad_cam does not match cam_size^2")
        return cls(
            patch_index=msg.patch_index,
            row=msg.row,
            col=msg.col,
            x_l0=msg.x_l0,
            y_l0=msg.y_l0,
            width_l0=msg.width_l0,
            height_l0=msg.height_l0,
            image_jpeg=msg.image_jpeg,
            class_name=msg.class_name,
            probabilities=np.asarray(msg.probabilities, np.float32),
            attention=msg.attention if msg.HasField("attention") else None,
            grad_cam=np.asarray(msg.grad_cam, np.float32).reshape(s, s),
            rank=msg.rank,
            score=msg.score,
            class_probability=msg.class_probability,
            stain=stain,
        )

    def image_rgb(self) -> npt.NDArray[np.uint8]:
        """The decoded patch, uint8 ``[S, S, 3]`` RGB (OpenCV, imported lazily)."""
        import cv2

        bgr = cv2.imdecode(np.frombuffer(self.image_jpeg, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InternalError("the server sent a patch image that does not decode")
        return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)

    def grad_cam_normalised(self) -> npt.NDArray[np.float32]:
        """Grad-CAM divided by its maximum, in [0, 1] (all zeros stay zeros)."""
        peak = float(self.grad_cam.max())
        return self.grad_cam / peak if peak > 0 else np.zeros_like(self.grad_cam)


def explain_request(
    slide_path: str | PurePath | UploadedSlide | DicomWebSlide,
    *,
    top_k: int | None = 8,
    rank_by: str = "attention",
    patch_indices: list[int] | None = None,
    class_name: str | None = None,
    options: AnalysisOptions | None = None,
    jpeg_quality: int = 90,
    request_id: str | None = None,
) -> pb.ExplainPatchesRequest:
    """Build an ``ExplainPatchesRequest``: explicit ``patch_indices`` win over ``top_k``.

    ``slide_path`` is a path under the server's slide root, an
    :class:`~histohelper.client.uploads.UploadedSlide` (sent as ``upload_id``), or a
    DICOMweb series (a :class:`~histohelper.client.dicomweb.DicomWebSlide` or a
    ``dicomweb://NAME/STUDY_UID/SERIES_UID`` string, sent as ``dicomweb``).

    Raises:
        ValueError: an unknown ``rank_by``.
        SlidePathError: a malformed ``dicomweb://`` URI.
    """
    if rank_by not in ("attention", "probability"):
        raise ValueError("rank_by must be 'attention' or 'probability'")
    request = pb.ExplainPatchesRequest(
        class_name=class_name or "",
        jpeg_quality=jpeg_quality,
        request_id=request_id or "",
    )
    field, value = slide_ref(slide_path)
    if isinstance(value, pb.DicomWebSeries):
        request.dicomweb.CopyFrom(value)
    else:
        setattr(request, field, value)
    if options is not None:
        request.options.CopyFrom(options.to_proto())
    if patch_indices is not None:
        request.patches.patch_index.extend(int(i) for i in patch_indices)
    else:
        request.top_k.k = int(top_k if top_k is not None else 8)
        request.top_k.rank_by = (
            pb.RANK_BY_ATTENTION if rank_by == "attention" else pb.RANK_BY_PROBABILITY
        )
    return request


def local_probabilities(
    cams: npt.NDArray[np.float32], logits: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Class probability per CAM cell.

    With a global-average-pool + linear head, ``mean_hw(cams) + bias = logits``, so
    ``bias = logits - mean_hw(cams)`` and ``cams + bias`` are local logits whose
    average is the patch logit. Their softmax over classes is a local probability.

    Args:
        cams: float32 ``[n, C, s, s]`` class activation maps.
        logits: float32 ``[n, C]`` patch logits.

    Returns:
        float32 ``[n, C, s, s]`` in [0, 1], summing to 1 over C.
    """
    bias = logits - cams.mean(axis=(2, 3))
    local = cams + bias[:, :, None, None]
    local = local - local.max(axis=1, keepdims=True)
    e = np.exp(local)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


#: Fewest patches from which :func:`cam_position_bias` estimates the shared pattern.
MIN_PATCHES_FOR_POSITION_BIAS = 8


def cam_position_bias(cams: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The position pattern every patch's CAM shares, to subtract before stitching.

    A CNN with zero padding sees where the image border is, so its class activation
    maps carry a pattern tied to the position inside the patch, whatever the tissue
    (Kayhan & van Gemert, "On translation invariance in CNNs", CVPR 2020; Islam et
    al., "How much position information do CNNs encode?", ICLR 2020). Stitched patch
    by patch it repeats at every patch and draws the patch grid: on the real test slide
    with the untrained ResNet18, the local probability jumps by 0.28 on average across
    patch borders against 0.11 between cells inside a patch (0.084 and 0.095 once the
    pattern is removed). Tissue lies anywhere relative to the grid, so the mean over
    the slide's patches of each CAM minus its own spatial mean is that pattern; it has
    zero spatial mean, so subtracting it keeps every patch's mean CAM and hence its
    patch logit.

    Args:
        cams: float32 ``[n, C, s, s]``.

    Returns:
        float32 ``[C, s, s]`` with zero spatial mean per class; all zeros when ``n`` is
        below :data:`MIN_PATCHES_FOR_POSITION_BIAS` (too few patches to tell the
        pattern from tissue).
    """
    n, c, s, _ = cams.shape
    if n < MIN_PATCHES_FOR_POSITION_BIAS:
        return np.zeros((c, s, s), np.float32)
    centred = cams.astype(np.float64) - cams.mean(axis=(2, 3), keepdims=True)
    return centred.mean(axis=0).astype(np.float32)


def cell_boxes(
    patches: PatchTable, class_index: int, *, remove_position_bias: bool = True
) -> tuple[npt.NDArray[np.float64], ...]:
    """Split each patch's level-0 box into its ``s x s`` CAM cells with their values.

    Args:
        patches: a patch table carrying ``cams`` and ``logits``.
        class_index: which class's local probability to return.
        remove_position_bias: subtract :func:`cam_position_bias` from the CAMs first
            (default), so the stitched map does not draw the patch grid.

    Returns:
        (x_l0, y_l0, width_l0, height_l0, values), each float64 ``[n * s * s]``: the
        exact level-0 box of every CAM cell and its local class probability.
    """
    if patches.cams is None or patches.logits is None:
        raise ValueError("the patch table carries no CAMs")
    s = patches.cams.shape[-1]
    cams = patches.cams
    if remove_position_bias:
        cams = cams - cam_position_bias(cams)[None]
    probs = local_probabilities(cams, patches.logits)[:, class_index]  # [n, s, s]
    jj, ii = np.meshgrid(np.arange(s), np.arange(s))  # jj: column, ii: row of the cell
    cw = (patches.width_l0 / s)[:, None, None]
    ch = (patches.height_l0 / s)[:, None, None]
    x = patches.x_l0[:, None, None] + jj[None] * cw
    y = patches.y_l0[:, None, None] + ii[None] * ch
    shape = probs.shape
    return (
        x.ravel(),
        y.ravel(),
        np.broadcast_to(cw, shape).ravel(),
        np.broadcast_to(ch, shape).ravel(),
        probs.astype(np.float64).ravel(),
    )


def render_gallery(
    explanations: list[PatchExplanation],
    *,
    columns: int = 4,
    tile_px: int = 224,
    alpha: float = 0.45,
    untrained: bool = False,
) -> npt.NDArray[np.uint8]:
    """A gallery: for each patch, the image beside its Grad-CAM overlay, with scores.

    The Grad-CAM map (normalised by its maximum) is upsampled bilinearly to the patch
    and blended with OpenCV COLORMAP_JET. Captions: rank, score, attention, class
    probability, grid row/col.

    Args:
        explanations: patches in display order.
        columns: patches per gallery row.
        tile_px: side of each image tile.
        alpha: heatmap opacity.
        untrained: print an UNTRAINED banner.

    Returns:
        uint8 ``[H, W, 3]`` RGB.
    """
    import cv2

    caption_px = 44
    banner_px = 28
    n = max(1, len(explanations))
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    cell_w, cell_h = 2 * tile_px + 12, tile_px + caption_px + 12
    canvas = np.full((banner_px + rows * cell_h, cols * cell_w, 3), 255, np.uint8)
    title = "Grad-CAM (ResNet18 layer4) of top patches"
    if explanations:
        title += f" - class {explanations[0].class_name}"
    cv2.putText(canvas, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    if untrained:
        cv2.putText(
            canvas, "UNTRAINED", (canvas.shape[1] - 120, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
            (200, 0, 0), 2, cv2.LINE_AA,
        )  # fmt: skip
    for k, ex in enumerate(explanations):
        r, c = divmod(k, cols)
        y0, x0 = banner_px + r * cell_h + 6, c * cell_w + 6
        image = cv2.resize(ex.image_rgb(), (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        cam = cv2.resize(
            ex.grad_cam_normalised(), (tile_px, tile_px), interpolation=cv2.INTER_LINEAR
        )
        heat = cv2.applyColorMap(np.round(cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
        heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
        blended = cv2.addWeighted(image, 1 - alpha, heat, alpha, 0)
        canvas[y0 : y0 + tile_px, x0 : x0 + tile_px] = image
        canvas[y0 : y0 + tile_px, x0 + tile_px : x0 + 2 * tile_px] = blended
        line1 = f"#{ex.rank + 1} score {ex.score:.4f}  row {ex.row} col {ex.col}"
        att = f"attention {ex.attention:.4f}  " if ex.attention is not None else ""
        line2 = f"{att}P({ex.class_name}) {ex.class_probability:.3f}"
        for j, text in enumerate((line1, line2)):
            cv2.putText(
                canvas, text, (x0, y0 + tile_px + 16 + 18 * j), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA,
            )  # fmt: skip
    return canvas
