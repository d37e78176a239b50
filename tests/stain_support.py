"""A stain-perturbed copy of a real slide, for the stain-normalisation tests and
benchmarks/stain_bench.py.

The perturbation is HED-space jitter (scikit-image's Ruifrok-Johnston colour
deconvolution, ``skimage.color.rgb2hed`` / ``hed2rgb``), as stain augmentation does:
each stain's concentration scaled and shifted,
``hed[..., c] = hed[..., c] * scale[c] + shift[c]``. :data:`PERTURBATION` is the
documented strength used everywhere: hematoxylin x 1.35, eosin x 0.65 (a darker
nuclear stain and a paler eosin, as between two labs' protocols), DAB unchanged, no
shift. The copy is written as a tiled pyramidal TIFF (tifffile, zlib, 256 px tiles,
levels 1/4 and 1/16) with the source's mpp in its resolution tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from synthetic_slides import write_slide


@dataclass(frozen=True)
class HedJitter:
    """Per-stain scale and shift of HED concentrations (hematoxylin, eosin, DAB)."""

    scale: tuple[float, float, float] = (1.35, 0.65, 1.0)
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)


PERTURBATION = HedJitter()


def hed_jitter(
    rgb: npt.NDArray[np.uint8], jitter: HedJitter = PERTURBATION
) -> npt.NDArray[np.uint8]:
    """``[h, w, 3]`` uint8 RGB re-stained by ``jitter`` in HED space (scikit-image)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed = hed * np.asarray(jitter.scale) + np.asarray(jitter.shift)
    out = hed2rgb(hed)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def write_perturbed_copy(
    source: Path, out: Path, jitter: HedJitter = PERTURBATION
) -> tuple[Path, float]:
    """Read ``source``'s level 0 (OpenSlide), re-stain it and write it as a pyramidal
    TIFF at the same mpp. Returns ``(out, mpp)``."""
    import openslide

    with openslide.OpenSlide(str(source)) as slide:
        w, h = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    perturbed = hed_jitter(rgb, jitter)
    sizes = [(max(1, w // d), max(1, h // d)) for d in (4, 16)]
    write_slide(out, perturbed, sizes, mpp=mpp)
    return out, mpp


def _by_cell(result: Any) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    p = result.patches
    return {
        (int(r), int(c)): (p.embeddings[i], p.probabilities[i])
        for i, (r, c) in enumerate(zip(p.row, p.col, strict=True))
    }


def measure_agreement(
    client: Any, original: str, perturbed: str, method: str | None
) -> dict[str, float]:
    """How closely two slides' served patches agree (same grid cell), with ``method``
    applied to the published reference (None: off).

    Args:
        client: a :class:`histohelper.client.SlideClient`.
        original, perturbed: slide paths under the server's slide root.
        method: ``"macenko"``, ``"reinhard"`` or None.

    Returns:
        ``cosine``: mean cosine similarity of the embeddings; ``centred_cosine``: the
        same after subtracting the mean embedding of both slides' patches (the
        untrained network's embeddings share a large common part, which saturates the
        plain cosine near 1); ``prob_abs_diff``: mean absolute difference of the patch
        probabilities; ``cells``: grid cells compared.
    """
    from histohelper.client import AnalysisOptions

    options = AnalysisOptions(
        return_embeddings=True,
        return_attention=False,
        stain_normalization=method or "none",
        stain_reference="published" if method else None,
    )
    a = _by_cell(client.analyze(original, options))
    b = _by_cell(client.analyze(perturbed, options))
    cells = sorted(set(a) & set(b))
    ea = np.stack([a[k][0] for k in cells]).astype(np.float64)
    eb = np.stack([b[k][0] for k in cells]).astype(np.float64)
    mean = np.concatenate([ea, eb]).mean(axis=0)
    pa = np.stack([a[k][1] for k in cells])
    pb_ = np.stack([b[k][1] for k in cells])
    return {
        "cosine": _mean_cosine(ea, eb),
        "centred_cosine": _mean_cosine(ea - mean, eb - mean),
        "prob_abs_diff": float(np.abs(pa - pb_).mean()),
        "cells": float(len(cells)),
    }


def _mean_cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    cos = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.mean())
