"""The one layout of ``patches.csv``, shared by ``histohelper tile`` and ``analyze``.

Both commands write the same leading geometry columns, with the same names and
number formats, one row per patch in bag order (row-major over the grid), so a
tile preview and an analysis of the same slide agree cell for cell on these
columns. Each command adds its own columns after them: ``tile`` the marker-ink
fraction, ``analyze`` the model's outputs (``prob_<class>``..., ``attention``).

Stdlib only: the server's ``tile`` command (no torch) and the client (no server
code) both import it.
"""

from __future__ import annotations

from typing import Final, SupportsFloat, SupportsInt

#: The leading columns of every ``patches.csv``, in order.
GEOMETRY_COLUMNS: Final[tuple[str, ...]] = (
    "patch_index",
    "row",
    "col",
    "x_l0",
    "y_l0",
    "width_l0",
    "height_l0",
    "tissue_fraction",
    "is_edge",
)


def format_fraction(value: SupportsFloat) -> str:
    """A fraction or probability in [0, 1] as written in ``patches.csv`` (6 significant
    digits, ``%.6g``); NaN is written as an empty cell."""
    v = float(value)
    return "" if v != v else f"{v:.6g}"


def geometry_cells(
    patch_index: SupportsInt,
    row: SupportsInt,
    col: SupportsInt,
    x_l0: SupportsFloat,
    y_l0: SupportsFloat,
    width_l0: SupportsFloat,
    height_l0: SupportsFloat,
    tissue_fraction: SupportsFloat,
    is_edge: object,
) -> list[str]:
    """The :data:`GEOMETRY_COLUMNS` cells of one patch.

    Args:
        patch_index: index in the bag (row-major grid order).
        row, col: grid position.
        x_l0, y_l0, width_l0, height_l0: the exact level-0 box (level-0 px); written
            as the shortest decimal that reads back as the same float64 (``repr``),
            never rounded.
        tissue_fraction: tissue share of the footprint in [0, 1] (:func:`format_fraction`).
        is_edge: whether the patch overhangs the slide's edge; written ``0`` or ``1``.

    Returns:
        One string per column of :data:`GEOMETRY_COLUMNS`.
    """
    return [
        str(int(patch_index)),
        str(int(row)),
        str(int(col)),
        repr(float(x_l0)),
        repr(float(y_l0)),
        repr(float(width_l0)),
        repr(float(height_l0)),
        format_fraction(tissue_fraction),
        "1" if is_edge else "0",
    ]
