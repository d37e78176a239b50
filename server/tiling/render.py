"""Quick-look images of a tiling plan: mask PNG and thumbnail with the grid drawn on."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.regions import draw_mask_outline

from .plan import TilingPlan


def mask_image(plan: TilingPlan) -> npt.NDArray[np.uint8]:
    """The tissue mask as ``[h, w]`` uint8 (255 = tissue, 0 = background), mask frame."""
    return plan.mask.mask.astype(np.uint8) * 255


def grid_overlay(plan: TilingPlan) -> npt.NDArray[np.uint8]:
    """The thumbnail with the tissue outline (blue), the region of interest's outline
    (red, 2 px, when the plan has one) and kept patches drawn.

    Kept patches are green rectangles (orange when flagged ``is_edge``, magenta when
    more than 25% ink). Boxes are mapped from level-0 px with the thumbnail's
    per-axis scales. The region is drawn as the grid rule saw it: its raster on the
    tissue mask's pixel grid (:attr:`TilingPlan.region`).

    Returns:
        ``[h, w, 3]`` uint8 RGB in the thumbnail frame.
    """
    img = np.array(plan.thumbnail, copy=True)
    th, tw = img.shape[:2]
    m = plan.mask
    # Mask -> thumbnail frame (mask px cover scale_x level-0 px; thumbnail tsx).
    mw = max(1, round(m.mask.shape[1] * m.scale_x / plan.thumbnail_scale_x))
    mh = max(1, round(m.mask.shape[0] * m.scale_y / plan.thumbnail_scale_y))
    mask_t = cv2.resize(m.mask.astype(np.uint8), (mw, mh), interpolation=cv2.INTER_NEAREST)
    mask_t = mask_t[:th, :tw]
    contours, _ = cv2.findContours(mask_t, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, (0, 90, 255), 1)
    if plan.region is not None:
        region_t = cv2.resize(
            plan.region.astype(np.uint8), (mw, mh), interpolation=cv2.INTER_NEAREST
        )[:th, :tw]
        draw_mask_outline(img, region_t, (230, 0, 0), 2)
    g = plan.grid
    sx, sy = plan.thumbnail_scale_x, plan.thumbnail_scale_y
    for i in range(len(g)):
        x0, y0 = g.x_l0[i] / sx, g.y_l0[i] / sy
        x1, y1 = (g.x_l0[i] + g.width_l0[i]) / sx, (g.y_l0[i] + g.height_l0[i]) / sy
        color = (0, 170, 0)
        if g.is_edge[i]:
            color = (255, 140, 0)
        if g.ink_fraction[i] > 0.25:
            color = (220, 0, 220)
        cv2.rectangle(img, (round(x0), round(y0)), (round(x1) - 1, round(y1) - 1), color, 1)
    return img


def preview_indices(n: int, count: int) -> npt.NDArray[np.int64]:
    """``count`` grid indices spread evenly over ``n`` kept patches (row-major), or all
    of them when there are fewer (sorted, unique)."""
    if n <= 0 or count <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.round(np.linspace(0, n - 1, min(n, count))).astype(np.int64))


def stain_preview(
    originals: npt.NDArray[np.uint8],
    normalised: npt.NDArray[np.uint8],
    indices: npt.NDArray[np.int64],
    title: str,
    columns: int = 4,
) -> npt.NDArray[np.uint8]:
    """A sheet of patches, each read as the analysis reads it beside its stain-normalised
    version, captioned with its grid index.

    Args:
        originals: ``[n, S, S, 3]`` uint8 RGB patches.
        normalised: the same patches normalised, same shape.
        indices: ``[n]`` their grid indices (captions).
        title: the top line (e.g. what was fitted and applied).
        columns: patch pairs per row.

    Returns:
        ``[h, w, 3]`` uint8 RGB.
    """
    n, s = originals.shape[0], originals.shape[1]
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    gap, caption, banner = 8, 20, 28
    cell_w, cell_h = 2 * s + 3 * gap, s + caption + gap
    img = np.full((banner + rows * cell_h, max(1, cols * cell_w), 3), 255, np.uint8)
    cv2.putText(img, title, (gap, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = banner + r * cell_h, c * cell_w + gap
        img[y0 : y0 + s, x0 : x0 + s] = originals[k]
        img[y0 : y0 + s, x0 + s + gap : x0 + 2 * s + gap] = normalised[k]
        text = f"patch {int(indices[k])}: read | normalised"
        cv2.putText(img, text, (x0, y0 + s + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1,
                    cv2.LINE_AA)  # fmt: skip
    return img
