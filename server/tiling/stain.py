"""Stain normalisation of H&E patches: fitted once per slide, applied per patch.

A method is a registry row (:class:`StainMethodSpec`): ``fit`` turns tissue pixels into
the stain statistics of their source (:class:`StainStats`), ``apply`` maps a batch of
patches from a source's statistics to a target's. The server fits on the tissue pixels
of the low-resolution image the tissue mask already read (``TilingPlan.tissue_rgb``),
once per slide, so neighbouring patches get the same transform; the reader threads
apply it to every patch (:class:`StainNormalizer` is the callable they hold).

Methods (numpy and OpenCV, no gRPC, no torch):

* ``"macenko"``: Macenko et al., "A method for normalizing histology slides for
  quantitative analysis", ISBI 2009. Optical density ``OD = -ln((I + 1) / Io)``
  (``Io`` = 240), pixels with every channel's OD >= 0.15 kept; the plane of the two
  largest eigenvectors of their OD covariance; the stain vectors at the 1st and 99th
  percentile of the angle within that plane (the one with the larger red OD is
  hematoxylin); concentrations by least squares, their 99th percentiles as the
  maxima. Applying: concentrations of the source matrix, scaled by
  ``max_target / max_source``, re-coloured with the target matrix. The linear part
  folds into one 3 x 3 matrix on OD (:func:`macenko_od_matrix`), so a patch costs a
  256-entry OD lookup (``cv2.LUT``), one ``cv2.transform``, one ``cv2.exp`` and one
  saturating conversion (``cv2.addWeighted``): 0.6 ms per 224 px patch on a 2-core host,
  10 to 15 times less than torchstain's numpy code (benchmarks/stain_bench.py). The recipe and
  constants follow M. Veta's ``normalizeStaining.m`` as ported by torchstain 1.4.1
  (``NumpyMacenkoNormalizer``); the eigenvector signs are fixed as StainTools does
  (principal vector positive), so the angles never wrap.
* ``"reinhard"``: Reinhard et al., "Color transfer between images", IEEE CG&A 2001:
  per-channel mean and standard deviation matched in Ruderman's l-alpha-beta space,
  computed as HistomicsTK computes it (RGB 0..255 -> LMS with Reinhard's matrix,
  natural log, decorrelating rotation), so HistomicsTK's published target applies.
  The affine in log-LMS folds into one 3 x 4 matrix (:func:`reinhard_log_lms_affine`).

Vahadane et al. (IEEE TMI 2016) is not offered: its sparse NMF needs SPAMS (or
scikit-learn's dictionary learning, seconds per fit), and no maintained library gives
it cheaply.

Published references (:data:`PUBLISHED`): Macenko's H&E matrix ``[[0.5626, 0.7201,
0.4062], [0.2159, 0.8012, 0.5581]]`` and maximum concentrations ``[1.9705, 1.0308]``
(Veta's ``normalizeStaining.m``, the defaults of torchstain and HEnorm_python);
Reinhard's l-alpha-beta means ``[8.74108109, -0.12440419, 0.0444982]`` and standard
deviations ``[0.6135447, 0.10989545, 0.0286032]``, HistomicsTK's colour standard from
the TCGA-A2-A3XS-DX1 region of Amgad et al., Bioinformatics 2019.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.errors import InvalidOptionsError

#: Transmitted light intensity of Macenko's optical density (torchstain's ``Io``).
MACENKO_IO = 240.0
#: OD below which a channel counts as background in the Macenko fit.
MACENKO_BETA = 0.15
#: Percentile of the angle for the extreme stain vectors (Macenko's alpha).
MACENKO_ALPHA = 1.0
#: Fewest usable tissue pixels a fit accepts; fewer is a fit failure, not a guess.
MIN_FIT_PIXELS = 500
#: Most pixels a fit uses (a deterministic even subsample of more).
MAX_FIT_PIXELS = 262_144

StainMethodName = Literal["none", "macenko", "reinhard"]
#: Methods the API may ask for; "none" is the absence of one.
STAIN_METHODS: tuple[str, ...] = ("none", "macenko", "reinhard")


class StainFitError(ValueError):
    """The stain statistics could not be fitted (too few tissue pixels, degenerate
    colours). The caller leaves the patches unnormalised and reports a warning."""


@dataclass(frozen=True)
class StainStats:
    """Stain statistics of one source or target (plain tuples, so they hash and print).

    Attributes:
        stain_matrix: Macenko: 6 floats, ``[2, 3]`` row-major, hematoxylin then eosin
            unit optical-density vectors over R, G, B.
        max_concentrations: Macenko: 2 floats, 99th-percentile H and E concentrations.
        means: Reinhard: 3 floats, l-alpha-beta channel means.
        stds: Reinhard: 3 floats, l-alpha-beta channel standard deviations (> 0).
    """

    stain_matrix: tuple[float, ...] = ()
    max_concentrations: tuple[float, ...] = ()
    means: tuple[float, ...] = ()
    stds: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, list[float]]:
        """JSON form (the non-empty fields), e.g. for a model manifest."""
        return {k: list(v) for k, v in vars(self).items() if v}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> StainStats:
        """Inverse of :meth:`as_dict`.

        Raises:
            InvalidOptionsError: an unknown key or a non-finite value.
        """
        known = {"stain_matrix", "max_concentrations", "means", "stds"}
        if not set(data) <= known:
            raise InvalidOptionsError(f"unknown stain statistics {sorted(set(data) - known)}")
        values = {k: tuple(float(x) for x in v) for k, v in data.items()}
        if not all(math.isfinite(x) for v in values.values() for x in v):
            raise InvalidOptionsError("stain statistics must be finite numbers")
        return cls(**values)


FitFn = Callable[[npt.NDArray[np.uint8]], StainStats]
ApplyFn = Callable[[npt.NDArray[np.uint8], StainStats, StainStats], npt.NDArray[np.uint8]]


@dataclass(frozen=True)
class StainMethodSpec:
    """One stain normalisation method.

    Attributes:
        name: the API's name (``"macenko"``, ``"reinhard"``).
        fit: ``[N, 3]`` uint8 RGB tissue pixels -> :class:`StainStats` (raises
            :class:`StainFitError`).
        apply: ``(images [..., 3] uint8, source, target) -> images`` of the same shape.
        check: raises :class:`InvalidOptionsError` when statistics do not suit the method.
    """

    name: str
    fit: FitFn
    apply: ApplyFn
    check: Callable[[StainStats], None]


_METHODS: dict[str, StainMethodSpec] = {}


def register_stain_method(spec: StainMethodSpec) -> None:
    """Add a stain normalisation method (or replace one of the same name)."""
    _METHODS[spec.name] = spec


def stain_methods() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(_METHODS)


def get_stain_method(name: str) -> StainMethodSpec:
    """The method registered as ``name``.

    Raises:
        InvalidOptionsError: no method of that name (the message lists the known ones).
    """
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(_METHODS)
        raise InvalidOptionsError(f"unknown stain method {name!r} (known: {known})") from None


def sample_pixels(
    pixels: npt.NDArray[np.uint8], max_pixels: int = MAX_FIT_PIXELS
) -> npt.NDArray[np.uint8]:
    """At most ``max_pixels`` rows of ``[N, 3]`` pixels, an even deterministic subsample."""
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, 3)
    if flat.shape[0] <= max_pixels:
        return flat
    idx = np.linspace(0, flat.shape[0] - 1, max_pixels).astype(np.int64)
    return flat[idx]


# --- Macenko ------------------------------------------------------------------------------

_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / MACENKO_IO)).astype(np.float32)


def optical_density(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Optical density ``-ln((I + 1) / 240)`` per channel, same shape, float32."""
    return _OD_LUT[rgb]


def _macenko_fit(pixels: npt.NDArray[np.uint8]) -> StainStats:
    od = optical_density(sample_pixels(pixels)).astype(np.float64)
    od_hat = od[np.all(od >= MACENKO_BETA, axis=1)]
    if od_hat.shape[0] < MIN_FIT_PIXELS:
        raise StainFitError(
            f"only {od_hat.shape[0]} stained tissue pixels (at least {MIN_FIT_PIXELS} needed)"
        )
    _, vecs = np.linalg.eigh(np.cov(od_hat.T))
    plane = vecs[:, [2, 1]]  # largest eigenvalue first
    plane *= np.where(plane[0] < 0, -1.0, 1.0)  # StainTools' sign: angles never wrap
    t_hat = od_hat @ plane
    phi = np.arctan2(t_hat[:, 1], t_hat[:, 0])
    lo, hi = np.percentile(phi, [MACENKO_ALPHA, 100.0 - MACENKO_ALPHA])
    v_lo = plane @ np.array([math.cos(lo), math.sin(lo)])
    v_hi = plane @ np.array([math.cos(hi), math.sin(hi)])
    he = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo])  # [2, 3], H first
    if not np.all(np.isfinite(he)) or abs(float(np.linalg.det(he @ he.T))) < 1e-6:
        raise StainFitError("the tissue's colours do not span two stains")
    conc = od @ np.linalg.pinv(he)  # [N, 2] over every pixel, as Macenko
    max_c = np.percentile(conc, 99, axis=0)
    if not np.all(max_c > 1e-6):
        raise StainFitError("a stain has no concentration in the tissue")
    return StainStats(
        stain_matrix=tuple(float(x) for x in he.ravel()),
        max_concentrations=tuple(float(x) for x in max_c),
    )


def macenko_od_matrix(source: StainStats, target: StainStats) -> npt.NDArray[np.float64]:
    """The ``[3, 3]`` map from a pixel's OD to its normalised OD (column vectors).

    ``OD' = HE_t^T diag(max_t / max_s) pinv(HE_s^T) OD``: concentrations by least
    squares on the source matrix, rescaled to the target's maxima, re-coloured.
    """
    he_s = np.asarray(source.stain_matrix, np.float64).reshape(2, 3)
    he_t = np.asarray(target.stain_matrix, np.float64).reshape(2, 3)
    scale = np.asarray(target.max_concentrations) / np.asarray(source.max_concentrations)
    return np.asarray(he_t.T @ np.diag(scale) @ np.linalg.pinv(he_s.T), np.float64)


def _macenko_apply(
    images: npt.NDArray[np.uint8], source: StainStats, target: StainStats
) -> npt.NDArray[np.uint8]:
    m = macenko_od_matrix(source, target).astype(np.float32)
    od = cv2.LUT(images.reshape(-1, 1, 3), _OD_LUT)  # float32 OD, one table lookup
    light = cv2.exp(cv2.transform(od, -m))
    # I = Io exp(-OD) - 1, the exact inverse of optical_density (torchstain leaves out
    # the -1, which brightens every pixel by one level), rounded and saturated to uint8.
    out = cv2.addWeighted(light, MACENKO_IO, light, 0.0, -1.0, dtype=cv2.CV_8U)
    return np.asarray(out, np.uint8).reshape(images.shape)


def _check_macenko(stats: StainStats) -> None:
    if len(stats.stain_matrix) != 6 or len(stats.max_concentrations) != 2:
        raise InvalidOptionsError(
            "Macenko statistics need a [2, 3] stain_matrix and 2 max_concentrations"
        )
    if not all(c > 0 for c in stats.max_concentrations):
        raise InvalidOptionsError("Macenko max_concentrations must be > 0")


# --- Reinhard -----------------------------------------------------------------------------

#: Reinhard et al. 2001's RGB -> LMS matrix (HistomicsTK ``_rgb2lms``).
RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
#: log-LMS -> l-alpha-beta (Ruderman et al. 1998; HistomicsTK ``_lms2lab``).
LMS2LAB = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
_EPS = float(np.spacing(1))


def rgb_to_lab(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """Ruderman l-alpha-beta of ``[..., 3]`` uint8 RGB (0..255, natural log, as
    HistomicsTK's ``rgb_to_lab``), float64, same shape."""
    lms = rgb.reshape(-1, 3).astype(np.float64) @ RGB2LMS.T
    lab = np.log(np.maximum(lms, _EPS)) @ LMS2LAB.T
    return lab.reshape(rgb.shape)


def _reinhard_fit(pixels: npt.NDArray[np.uint8]) -> StainStats:
    flat = sample_pixels(pixels)
    if flat.shape[0] < MIN_FIT_PIXELS:
        raise StainFitError(
            f"only {flat.shape[0]} tissue pixels (at least {MIN_FIT_PIXELS} needed)"
        )
    lab = rgb_to_lab(flat)
    std = lab.std(axis=0)
    if not np.all(std > 1e-6):
        raise StainFitError("the tissue's colours do not vary")
    return StainStats(
        means=tuple(float(x) for x in lab.mean(axis=0)), stds=tuple(float(x) for x in std)
    )


def reinhard_log_lms_affine(source: StainStats, target: StainStats) -> npt.NDArray[np.float64]:
    """The ``[3, 4]`` affine map of log-LMS (columns: matrix | offset) that matches the
    source's l-alpha-beta means and deviations to the target's."""
    ratio = np.asarray(target.stds) / np.asarray(source.stds)
    a = np.linalg.inv(LMS2LAB) @ np.diag(ratio) @ LMS2LAB
    b = np.linalg.inv(LMS2LAB) @ (np.asarray(target.means) - ratio * np.asarray(source.means))
    return np.concatenate([a, b[:, None]], axis=1)


_LMS2RGB = np.linalg.inv(RGB2LMS)


def _reinhard_apply(
    images: npt.NDArray[np.uint8], source: StainStats, target: StainStats
) -> npt.NDArray[np.uint8]:
    px = images.reshape(-1, 1, 3).astype(np.float32)
    lms = cv2.transform(px, RGB2LMS.astype(np.float32))
    log_lms = cv2.log(np.maximum(lms, np.float32(_EPS)))
    affine = reinhard_log_lms_affine(source, target).astype(np.float32)
    rgb = cv2.transform(cv2.exp(cv2.transform(log_lms, affine)), _LMS2RGB.astype(np.float32))
    out = cv2.addWeighted(rgb, 1.0, rgb, 0.0, 0.0, dtype=cv2.CV_8U)  # rounded, saturated
    return np.asarray(out, np.uint8).reshape(images.shape)


def _check_reinhard(stats: StainStats) -> None:
    if len(stats.means) != 3 or len(stats.stds) != 3:
        raise InvalidOptionsError("Reinhard statistics need 3 means and 3 stds")
    if not all(s > 0 for s in stats.stds):
        raise InvalidOptionsError("Reinhard stds must be > 0")


register_stain_method(StainMethodSpec("macenko", _macenko_fit, _macenko_apply, _check_macenko))
register_stain_method(StainMethodSpec("reinhard", _reinhard_fit, _reinhard_apply, _check_reinhard))

#: The published default reference of each method (see the module docstring).
PUBLISHED: dict[str, StainStats] = {
    "macenko": StainStats(
        stain_matrix=(0.5626, 0.7201, 0.4062, 0.2159, 0.8012, 0.5581),
        max_concentrations=(1.9705, 1.0308),
    ),
    "reinhard": StainStats(
        means=(8.74108109, -0.12440419, 0.0444982), stds=(0.6135447, 0.10989545, 0.0286032)
    ),
}


def fit_stain(method: str, pixels: npt.NDArray[np.uint8]) -> StainStats:
    """Fit ``method``'s statistics on tissue pixels.

    Args:
        method: a registered method name.
        pixels: ``[..., 3]`` uint8 RGB tissue pixels (any shape; flattened).

    Raises:
        InvalidOptionsError: unknown method.
        StainFitError: too few usable pixels or degenerate colours.
    """
    return get_stain_method(method).fit(np.asarray(pixels, np.uint8).reshape(-1, 3))


def fit_reference_image(method: str, rgb: npt.NDArray[np.uint8]) -> StainStats:
    """A target fitted on a reference image's stained pixels (:func:`stained_pixels`).

    Args:
        method: a registered method name.
        rgb: ``[h, w, 3]`` uint8 RGB reference image (e.g. a typical H&E tile).

    Raises:
        InvalidOptionsError: unknown method.
        StainFitError: the image has too little stained tissue.
    """
    return fit_stain(method, stained_pixels(rgb))


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted normalisation: call it on a batch of patches.

    Attributes:
        method: the registered method's name.
        source: statistics fitted on the slide (or images).
        target: the reference's statistics.
    """

    method: str
    source: StainStats
    target: StainStats

    def __call__(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Normalise ``[..., 3]`` uint8 RGB images (same shape and dtype out)."""
        if images.size == 0:
            return images
        return get_stain_method(self.method).apply(images, self.source, self.target)


# --- a request's choice and what was applied -------------------------------------------


@dataclass(frozen=True)
class StainChoice:
    """The stain normalisation one call asks for, resolved against the model's
    declaration and the server's reference (the result cache keys on it).

    Attributes:
        method: ``"none"`` or a registered method.
        reference: where ``target`` came from: ``"published"``, ``"model"``,
            ``"server"``; empty for ``"none"``.
        source: why this method: ``"request"``, ``"model"`` (the manifest's
            declaration) or ``"default"`` (nothing asked, nothing declared).
        target: the reference's statistics (empty for ``"none"``).
    """

    method: str = "none"
    reference: str = ""
    source: str = "default"
    target: StainStats = StainStats()


#: No normalisation, nothing asked.
NO_STAIN = StainChoice()


@dataclass(frozen=True)
class AppliedStain:
    """What a call applied (``AppliedStainNormalization`` on the wire).

    Attributes:
        method: the method applied; ``"none"`` also when the fit failed.
        reference: as :attr:`StainChoice.reference`.
        source: as :attr:`StainChoice.source`.
        fitted: statistics fitted on the slide's (or the images') tissue pixels.
        warning: why nothing was applied although asked (fit failure), else empty.
    """

    method: str = "none"
    reference: str = ""
    source: str = "default"
    fitted: StainStats = StainStats()
    warning: str = ""


#: Nothing applied, nothing asked.
NOT_APPLIED = AppliedStain()


def read_reference_image(path: str | os.PathLike[str]) -> npt.NDArray[np.uint8]:
    """A reference image (PNG, JPEG, TIFF: what OpenCV reads) as ``[h, w, 3]`` uint8 RGB.

    Raises:
        InvalidOptionsError: the file cannot be read as an image.
    """
    bgr = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidOptionsError("the stain reference image could not be read")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8)


def reference_targets(rgb: npt.NDArray[np.uint8]) -> dict[str, StainStats]:
    """Every registered method's target fitted on one reference image.

    Raises:
        StainFitError: the image has too little stained tissue for some method.
    """
    return {name: fit_reference_image(name, rgb) for name in stain_methods()}


@functools.cache
def reference_file_targets(path: str) -> dict[str, StainStats]:
    """:func:`reference_targets` of an image file, fitted once per process and path
    (the server's ``--stain-reference``).

    Raises:
        InvalidOptionsError: unreadable image.
        StainFitError: too little stained tissue.
    """
    return reference_targets(read_reference_image(path))


def fit_normalizer(
    choice: StainChoice, tissue_rgb: npt.NDArray[np.uint8]
) -> tuple[StainNormalizer | None, AppliedStain]:
    """Fit ``choice`` on tissue pixels once; the normalizer to apply per patch.

    Args:
        choice: the call's resolved choice.
        tissue_rgb: ``[N, 3]`` uint8 RGB tissue pixels (e.g. ``TilingPlan.tissue_rgb``,
            the low-resolution level's tissue, or a request's images' stained pixels).

    Returns:
        ``(normalizer, applied)``: normalizer None when ``choice`` is ``"none"`` or the
        fit failed; then ``applied.method`` is ``"none"`` and, for a failed fit,
        ``applied.warning`` says why (never an error).
    """
    if choice.method == "none":
        return None, AppliedStain("none", "", choice.source)
    try:
        fitted = fit_stain(choice.method, tissue_rgb)
    except StainFitError as exc:
        warning = f"{choice.method} stain normalisation not applied: {exc}"
        return None, AppliedStain("none", choice.reference, choice.source, warning=warning)
    normalizer = StainNormalizer(choice.method, fitted, choice.target)
    return normalizer, AppliedStain(choice.method, choice.reference, choice.source, fitted)


def stained_pixels(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """``[N, 3]`` uint8: pixels of ``[..., 3]`` images that are neither near-white
    (every channel >= 220: glass) nor near-black (every channel <= 30), for fitting on
    images without a tissue mask (a reference image, a ClassifyPatches request)."""
    flat = np.asarray(images, np.uint8).reshape(-1, 3)
    return flat[(flat.min(axis=1) < 220) & (flat.max(axis=1) > 30)]
