"""Names of the overlay styles: colour maps and attention scales.

Kept free of OpenCV (and numpy) so the command line can offer the choices without
importing the rendering helper; :mod:`histohelper.client.render` maps each name to its
OpenCV colour map.

- Colour maps: ``jet`` (the default for probabilities, as before), ``viridis``,
  ``magma`` (perceptually uniform, readable by colour-blind readers and in grey) and
  ``turbo`` (a smoother jet). OpenCV ``COLORMAP_*`` tables.
- Attention scales: ``rank`` (the default; each patch's percentile rank among the
  slide's patches, rank / N as CLAM draws its heatmaps, so weights spanning
  0.0221..0.0248 still spread over the whole colour map) and ``raw`` (the weight itself
  on 0..max).
"""

from __future__ import annotations

COLORMAP_NAMES: tuple[str, ...] = ("jet", "viridis", "magma", "turbo")
DEFAULT_COLORMAP = "jet"
ATTENTION_SCALES: tuple[str, ...] = ("rank", "raw")
DEFAULT_ATTENTION_SCALE = "rank"


def check_colormap(name: str) -> str:
    """Return ``name`` if it is a known colour map.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name not in COLORMAP_NAMES:
        raise ValueError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAP_NAMES)}")
    return name


def check_attention_scale(name: str) -> str:
    """Return ``name`` if it is a known attention scale.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name not in ATTENTION_SCALES:
        raise ValueError(
            f"unknown attention scale {name!r}; choose one of {', '.join(ATTENTION_SCALES)}"
        )
    return name
