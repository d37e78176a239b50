"""A region of interest for an analysis request (``AnalysisOptions.roi``), as data.

The client carries the region as the user gave it (GeoJSON text as QuPath exports it,
or a mask PNG); the server parses, validates and applies it, and refuses a bad one
with ``InvalidOptionsError`` (INVALID_OPTIONS). Coordinates are level-0 px of the slide.
No geometry library is needed here.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from histohelper.errors import InvalidOptionsError
from histohelper.v1 import slide_analysis_pb2 as pb


@dataclass(frozen=True, slots=True)
class RegionOfInterest:
    """Restrict an analysis to a region: the grid keeps a patch when its tissue fraction
    *inside* the region (include minus exclude, and the mask) passes the minimum tissue
    fraction; ``SlideResult.qc.roi_excluded_patch_count`` says how many patches with
    enough tissue the region left out.

    Attributes:
        include_geojson: GeoJSON text of Polygon / MultiPolygon annotations, level-0 px
            (a QuPath "Export objects as GeoJSON" file as it is; holes honoured);
            ``""``: the whole slide (or the mask).
        exclude_geojson: GeoJSON text of regions to leave out; ``""``: none.
        mask_png: PNG bytes of a binary mask (nonzero = inside) anchored at level-0
            (0, 0); ``b""``: none.
        mask_downsample: level-0 px per mask px (> 0 with a mask).

    Raises:
        InvalidOptionsError: on construction, when nothing is given, or a mask without a
            positive finite downsample (or a downsample without a mask).
    """

    include_geojson: str = ""
    exclude_geojson: str = ""
    mask_png: bytes = field(default=b"", repr=False)
    mask_downsample: float = 0.0

    def __post_init__(self) -> None:
        if not (self.include_geojson or self.exclude_geojson or self.mask_png):
            raise InvalidOptionsError("a region of interest needs include, exclude or a mask")
        ds = self.mask_downsample
        if self.mask_png and not (isinstance(ds, int | float) and math.isfinite(ds) and ds > 0):
            raise InvalidOptionsError("mask_downsample must be a number > 0 with a mask")
        if ds and not self.mask_png:
            raise InvalidOptionsError("mask_downsample is set but there is no mask")

    @classmethod
    def from_files(
        cls,
        include: str | os.PathLike[str] | None = None,
        exclude: str | os.PathLike[str] | None = None,
        mask: str | os.PathLike[str] | None = None,
        mask_downsample: float = 0.0,
    ) -> RegionOfInterest:
        """Read the region's files (GeoJSON as UTF-8 text, the mask as bytes).

        Raises:
            OSError: a file cannot be read.
            InvalidOptionsError: as the constructor.
        """
        return cls(
            include_geojson=Path(include).read_text(encoding="utf-8-sig") if include else "",
            exclude_geojson=Path(exclude).read_text(encoding="utf-8-sig") if exclude else "",
            mask_png=Path(mask).read_bytes() if mask else b"",
            mask_downsample=float(mask_downsample),
        )

    def to_proto(self) -> pb.RegionOfInterest:
        """The wire message."""
        return pb.RegionOfInterest(
            include_geojson=self.include_geojson,
            exclude_geojson=self.exclude_geojson,
            mask_png=self.mask_png,
            mask_downsample=self.mask_downsample,
        )

    def sha256(self) -> str:
        """Hex SHA-256 of the region as sent (identifies it in cohort run manifests)."""
        digest = hashlib.sha256()
        for part in (self.include_geojson.encode(), self.exclude_geojson.encode(), self.mask_png):
            digest.update(len(part).to_bytes(8, "big") + part)
        digest.update(repr(float(self.mask_downsample)).encode())
        return digest.hexdigest()
