"""Tiling configuration: :class:`Resolution`, :class:`TilingOptions` and their CLI flags.

The defaults live here once; the ``histohelper tile`` command, the server and tests
all build options through :class:`TilingOptions` (or :func:`tiling_options_from_args`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal

from histohelper.errors import InvalidOptionsError

if TYPE_CHECKING:  # roi.py imports Shapely and OpenCV; options stay importable without
    from .roi import RegionOfInterest

#: Plausible level-0 um/px (0.01 to 100: beyond any brightfield scanner either way).
#: Metadata outside it is treated as missing; an override outside it is refused.
PLAUSIBLE_MPP_RANGE = (0.01, 100.0)


def plausible_mpp(value: object) -> bool:
    """Whether ``value`` is a number of um/px within :data:`PLAUSIBLE_MPP_RANGE`."""
    lo, hi = PLAUSIBLE_MPP_RANGE
    return isinstance(value, int | float) and lo <= value <= hi


ResolutionUnit = Literal["mpp", "magnification", "level"]
EdgeMode = Literal["pad", "drop"]
MaskMethod = Literal["saturation", "gray"]
#: What to do with a fluorescence or multiplex slide (:attr:`TilingOptions.fluorescence`).
FluorescenceMode = Literal["refuse", "read"]

#: Smallest patch side an analysis request may ask for (px at the target resolution):
#: 32 px is 16 um at 0.5 um/px, about two nuclei. The server resizes every patch to
#: the model's input (224 px for the bundled models), so a 32 px patch is already
#: enlarged 7x, and a grid grows as 1 / side^2 (1 px patches on a 1024 x 1024 px
#: slide: a million patches). :class:`TilingOptions` itself takes any side >= 1 (the
#: tiler's geometry is exact for any size); requests are held to these bounds
#: (:func:`check_request_geometry`).
MIN_REQUEST_PATCH_SIZE_PX = 32
#: Smallest stride an analysis request may ask for (px at the target resolution).
MIN_REQUEST_STRIDE_PX = 16
#: A request's stride must be at least its patch side / this (at most 8 x 8 = 64
#: overlapping patches over any point, 64x the patches of a grid without overlap).
MAX_REQUEST_OVERLAP = 8


def check_request_geometry(patch_size_px: int, stride_px: int | None) -> None:
    """Refuse patch geometry no analysis needs, which would only make huge grids.

    Args:
        patch_size_px: the effective patch side (px at the target resolution).
        stride_px: the requested stride (px at the target resolution), None for the
            patch side.

    Raises:
        InvalidOptionsError: ``patch_size_px`` below :data:`MIN_REQUEST_PATCH_SIZE_PX`,
            or ``stride_px`` below :data:`MIN_REQUEST_STRIDE_PX` or below
            ``patch_size_px / MAX_REQUEST_OVERLAP`` (rounded up).
    """
    if patch_size_px < MIN_REQUEST_PATCH_SIZE_PX:
        raise InvalidOptionsError(
            f"patch_size_px must be at least {MIN_REQUEST_PATCH_SIZE_PX} px "
            f"(got {patch_size_px}); patches are resized to the model's input"
        )
    if stride_px is None:
        return
    least = max(MIN_REQUEST_STRIDE_PX, -(-patch_size_px // MAX_REQUEST_OVERLAP))
    if stride_px < least:
        raise InvalidOptionsError(
            f"stride_px must be at least {least} px for {patch_size_px} px patches "
            f"(got {stride_px}; at least {MIN_REQUEST_STRIDE_PX} px and 1/"
            f"{MAX_REQUEST_OVERLAP} of the patch side)"
        )


@dataclass(frozen=True)
class Resolution:
    """A target resolution: value plus unit (TIAToolbox's vocabulary).

    Attributes:
        value: micrometres per pixel (``"mpp"``), objective magnification such as 20
            (``"magnification"``, 10 / mpp by the usual convention), or a pyramid
            level index (``"level"``, read at that level's native resolution).
        unit: one of ``"mpp"``, ``"magnification"``, ``"level"``.

    Raises:
        InvalidOptionsError: unknown unit, non-finite value, an mpp outside
            :data:`PLAUSIBLE_MPP_RANGE` (a magnification outside 10 / that range),
            or a non-integer / negative level.
    """

    value: float
    unit: ResolutionUnit = "mpp"

    def __post_init__(self) -> None:
        if self.unit not in ("mpp", "magnification", "level"):
            raise InvalidOptionsError(f"unknown resolution unit {self.unit!r}")
        if not isinstance(self.value, int | float) or not math.isfinite(self.value):
            raise InvalidOptionsError("resolution value must be a finite number")
        if self.unit == "level":
            if self.value < 0 or int(self.value) != self.value:
                raise InvalidOptionsError("a level resolution must be a non-negative integer")
        elif self.unit == "mpp":
            if not plausible_mpp(self.value):
                lo, hi = PLAUSIBLE_MPP_RANGE
                raise InvalidOptionsError(f"a target mpp must be in [{lo:g}, {hi:g}] um/px")
        else:
            lo, hi = 10.0 / PLAUSIBLE_MPP_RANGE[1], 10.0 / PLAUSIBLE_MPP_RANGE[0]
            if not (lo <= self.value <= hi):
                raise InvalidOptionsError(f"a target magnification must be in [{lo:g}, {hi:g}]")


@dataclass(frozen=True)
class TilingOptions:
    """How to build the tissue mask and the patch grid of one slide.

    Attributes:
        patch_size_px: output patch side at the target resolution (px).
        target: resolution of the output patches.
        stride_px: distance between patch origins at the target resolution (px);
            ``None`` means ``patch_size_px`` (no overlap).
        min_tissue_fraction: keep a patch when at least this fraction of its
            footprint is tissue (0..1).
        edge_mode: ``"pad"`` keeps patches overhanging the slide edge (read
            white-padded, flagged ``is_edge``); ``"drop"`` omits them.
        mpp_override: level-0 um/px to use instead of the slide's metadata, within
            :data:`PLAUSIBLE_MPP_RANGE`.
        mask_target_side_px: longest side of the low-resolution image the mask is
            computed on (px); the mask is read from the pyramid near this size.
        mask_min_um_per_px: when > 0, the mask image is made no finer than this many
            um per mask px (from the resolved level-0 mpp): the longest side becomes
            ``min(mask_target_side_px, slide side in um / mask_min_um_per_px)``, at
            least 16 px. A small biopsy then reads a reduced level instead of decoding
            level 0 for a mask finer than its patches need (CLAM segments at a 1/64
            level, ~16 um/px at 40x). 0 (the default) keeps ``mask_target_side_px``.
        mask_method: ``"saturation"`` (Otsu on HSV saturation, CLAM's recipe; the
            default) or ``"gray"`` (Otsu on inverted grayscale, for comparison).
        mask_median_ksize: median blur kernel on the thresholded channel (odd, 0 or
            1 = off).
        mask_close_ksize: morphological closing kernel (px of the mask, 0 = off).
        mask_min_saturation: floor for the saturation threshold (0..255): glass with
            noise always yields *some* Otsu threshold; this stops it being tiny.
        remove_dark: treat very dark pixels (HSV value below ``dark_value_max``) as
            background (black backgrounds, black ink, folds of debris).
        dark_value_max: HSV value (0..255) below which a pixel is "very dark".
        remove_ink: treat green/blue marker ink as background and report it.
        min_fragment_area_um2: drop tissue components smaller than this (um^2).
        min_hole_area_um2: fill holes in tissue smaller than this (um^2).
        mask_max_read_px: most level pixels read to build the mask; slides whose
            coarsest level is larger are *sampled* in thin bands (bounded time and
            memory) instead of read whole.
        mask_max_decode_px: most pixels a band-sampled mask may decode, counting
            every tile a band touches whole (a tile counts at least 256 x 256 px, for
            the per-tile cost of tiny tiles); fewer bands are taken to stay within it,
            and a slide that would need fewer than 16 is refused (SlideTooLargeError).
            The default, 2 Gpx, is about 10 s of JPEG decoding on one core.
        level_tolerance: relative slack when matching level downsamples to the target.
        max_patches: refuse grids with more kept patches than this.
        fluorescence: what to do with a slide whose pixels are fluorescence or
            multiplex channels (:attr:`~.slide.SlideMetadata.fluorescence`):
            ``"refuse"`` (the default) raises ``UnsupportedSlideError`` (a brightfield
            H&E model cannot read fluorescence); ``"read"`` reads the pixels as
            OpenSlide renders them (the first channel as grey RGB), finds tissue as
            brighter than the dark background (Otsu on grey value) and warns that the
            model's outputs are out of domain. Set by the server's ``--fluorescence``.
        roi: a region of interest (:class:`~.roi.RegionOfInterest`, level-0 px): the
            grid keeps a patch when its tissue fraction counted only inside the region
            passes ``min_tissue_fraction``. None: the whole slide.
    """

    patch_size_px: int = 224
    target: Resolution = field(default_factory=lambda: Resolution(0.5, "mpp"))
    stride_px: int | None = None
    min_tissue_fraction: float = 0.5
    edge_mode: EdgeMode = "pad"
    mpp_override: float | None = None
    mask_target_side_px: int = 1024
    mask_min_um_per_px: float = 0.0
    mask_method: MaskMethod = "saturation"
    mask_median_ksize: int = 7
    mask_close_ksize: int = 5
    mask_min_saturation: int = 20
    remove_dark: bool = True
    dark_value_max: int = 50
    remove_ink: bool = True
    min_fragment_area_um2: float = 5_000.0
    min_hole_area_um2: float = 2_000.0
    mask_max_read_px: int = 256 * 1024 * 1024
    mask_max_decode_px: int = 2 * 1024 * 1024 * 1024
    level_tolerance: float = 0.005
    max_patches: int = 2_000_000
    fluorescence: FluorescenceMode = "refuse"
    roi: RegionOfInterest | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidOptionsError:
            return InvalidOptionsError(msg)

        if not isinstance(self.target, Resolution):
            raise bad("target must be a Resolution")
        if not (isinstance(self.patch_size_px, int) and 1 <= self.patch_size_px <= 8192):
            raise bad("patch_size_px must be an integer in [1, 8192]")
        if self.stride_px is not None and not (
            isinstance(self.stride_px, int) and 1 <= self.stride_px <= 8192
        ):
            raise bad("stride_px must be None or an integer in [1, 8192]")
        if not (0.0 <= self.min_tissue_fraction <= 1.0):
            raise bad("min_tissue_fraction must be in [0, 1]")
        if self.edge_mode not in ("pad", "drop"):
            raise bad("edge_mode must be 'pad' or 'drop'")
        if self.mpp_override is not None and not plausible_mpp(self.mpp_override):
            lo, hi = PLAUSIBLE_MPP_RANGE
            raise bad(f"mpp_override must be a number of um/px in [{lo:g}, {hi:g}]")
        if not (16 <= self.mask_target_side_px <= 16384):
            raise bad("mask_target_side_px must be in [16, 16384]")
        if not (0.0 <= self.mask_min_um_per_px <= 1000.0):
            raise bad("mask_min_um_per_px must be in [0, 1000]")
        if self.mask_method not in ("saturation", "gray"):
            raise bad("mask_method must be 'saturation' or 'gray'")
        if self.mask_median_ksize < 0 or (
            self.mask_median_ksize > 1 and self.mask_median_ksize % 2 == 0
        ):
            raise bad("mask_median_ksize must be 0, 1 or an odd number")
        if not (0 <= self.mask_close_ksize <= 101):
            raise bad("mask_close_ksize must be in [0, 101]")
        if not (0 <= self.mask_min_saturation <= 255):
            raise bad("mask_min_saturation must be in [0, 255]")
        if not (0 <= self.dark_value_max <= 255):
            raise bad("dark_value_max must be in [0, 255]")
        if self.min_fragment_area_um2 < 0 or self.min_hole_area_um2 < 0:
            raise bad("area thresholds must be >= 0")
        if self.mask_max_read_px < 1_000_000:
            raise bad("mask_max_read_px must be >= 1,000,000")
        if self.mask_max_decode_px < 1_000_000:
            raise bad("mask_max_decode_px must be >= 1,000,000")
        if not (0.0 <= self.level_tolerance <= 0.1):
            raise bad("level_tolerance must be in [0, 0.1]")
        if self.max_patches < 1:
            raise bad("max_patches must be >= 1")
        if self.fluorescence not in ("refuse", "read"):
            raise bad("fluorescence must be 'refuse' or 'read'")
        if self.roi is not None and not isinstance(getattr(self.roi, "sha256", None), str):
            raise bad("roi must be a RegionOfInterest (histohelper.server.tiling.roi)")

    @property
    def effective_stride_px(self) -> int:
        """Stride at the target resolution (px): ``stride_px`` or ``patch_size_px``."""
        return self.patch_size_px if self.stride_px is None else self.stride_px


_DEFAULTS = TilingOptions()


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the tiling flags (defaults from :class:`TilingOptions`) to a parser.

    Args:
        parser: an argparse parser (or argument group) to extend in place.
    """
    g = parser.add_argument_group("tiling")
    d = _DEFAULTS
    g.add_argument(
        "--patch-size",
        type=int,
        default=d.patch_size_px,
        dest="patch_size_px",
        help="output patch side at the target resolution, px (default %(default)s)",
    )
    res = g.add_mutually_exclusive_group()
    res.add_argument(
        "--target-mpp",
        type=float,
        default=None,
        help=f"target resolution in um/px (default {d.target.value})",
    )
    res.add_argument(
        "--target-magnification",
        type=float,
        default=None,
        help="target objective magnification, e.g. 20 (10 / mpp)",
    )
    res.add_argument(
        "--target-level",
        type=int,
        default=None,
        help="read at this pyramid level's native resolution",
    )
    g.add_argument(
        "--stride",
        type=int,
        default=None,
        dest="stride_px",
        help="stride at the target resolution, px (default: patch size, no overlap)",
    )
    g.add_argument(
        "--min-tissue",
        type=float,
        default=d.min_tissue_fraction,
        dest="min_tissue_fraction",
        help="keep patches with at least this tissue fraction (default %(default)s)",
    )
    g.add_argument(
        "--edge-mode",
        choices=("pad", "drop"),
        default=d.edge_mode,
        help="edge patches: white-pad and flag, or drop (default %(default)s)",
    )
    g.add_argument(
        "--mpp-override",
        type=float,
        default=None,
        help="level-0 um/px to use instead of the slide's metadata",
    )
    g.add_argument(
        "--mask-method",
        choices=("saturation", "gray"),
        default=d.mask_method,
        help="Otsu channel for the tissue mask (default %(default)s; preview only: "
        "AnalyzeSlide always uses the default)",
    )
    g.add_argument(
        "--mask-side",
        type=int,
        default=d.mask_target_side_px,
        dest="mask_target_side_px",
        help="longest side of the mask image, px (default %(default)s; preview only: "
        "AnalyzeSlide always uses the default, bounded by serve --mask-min-um-per-px)",
    )
    g.add_argument(
        "--min-fragment-um2",
        type=float,
        default=d.min_fragment_area_um2,
        dest="min_fragment_area_um2",
        help="drop tissue fragments smaller than this, um^2 (default %(default)s; preview "
        "only: AnalyzeSlide always uses the default)",
    )
    g.add_argument(
        "--min-hole-um2",
        type=float,
        default=d.min_hole_area_um2,
        dest="min_hole_area_um2",
        help="fill holes smaller than this, um^2 (default %(default)s; preview only: "
        "AnalyzeSlide always uses the default)",
    )
    g.add_argument(
        "--keep-dark",
        action="store_false",
        dest="remove_dark",
        help="do not treat very dark areas (and black ink) as background (preview only: "
        "AnalyzeSlide always does)",
    )
    g.add_argument(
        "--keep-ink",
        action="store_false",
        dest="remove_ink",
        help="do not treat marker ink (green/blue, red) as background, nor count it "
        "(preview only, e.g. to see what the ink rule removed: AnalyzeSlide always does)",
    )
    g.add_argument(
        "--fluorescence",
        choices=("refuse", "read"),
        default=d.fluorescence,
        help="fluorescence/multiplex slides: refuse them, or read the first channel as "
        "grey (tissue = brighter than the background) with a QC warning "
        "(default %(default)s)",
    )


def tiling_options_from_args(args: argparse.Namespace) -> TilingOptions:
    """Build :class:`TilingOptions` from flags added by :func:`add_tiling_arguments`.

    Raises:
        InvalidOptionsError: a value is out of range.
    """
    if getattr(args, "target_magnification", None) is not None:
        target = Resolution(float(args.target_magnification), "magnification")
    elif getattr(args, "target_level", None) is not None:
        target = Resolution(int(args.target_level), "level")
    elif getattr(args, "target_mpp", None) is not None:
        target = Resolution(float(args.target_mpp), "mpp")
    else:
        target = _DEFAULTS.target
    names = {f.name for f in fields(TilingOptions)} - {"target", "roi"}
    kwargs = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return TilingOptions(target=target, **kwargs)
