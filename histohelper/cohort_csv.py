"""The one reader of cohort CSV files (one row per slide), shared by every command
that takes a cohort: ``histohelper analyze`` (a manifest with per-slide options),
``histohelper features`` and ``histohelper-export train-mil``.

Each caller states the columns it allows and those it needs; this module checks the
header, strips the cells, refuses empty or repeated slides, and keeps file order. What a
cell means (labels, splits, options) is the caller's business.

Stdlib only: the client (no torch) and ``model_export`` (no grpc) both import it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass


class CohortError(ValueError):
    """A cohort CSV, or what it refers to, cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class CohortCsvRow:
    """One data row of a cohort CSV.

    Attributes:
        line: 1-based line number in the file (the header is line 1), for messages.
        cells: column -> stripped cell text for every column of the header ("" when empty).
    """

    line: int
    cells: dict[str, str]

    @property
    def slide(self) -> str:
        """The row's ``slide`` cell."""
        return self.cells["slide"]

    def get(self, column: str) -> str | None:
        """The cell of ``column``, or ``None`` when it is empty or not in the file."""
        return self.cells.get(column) or None


def read_cohort_csv(
    path: str | os.PathLike[str],
    allowed: Sequence[str],
    required: Sequence[str] = ("slide",),
) -> tuple[list[str], list[CohortCsvRow]]:
    """Read and check a cohort CSV (UTF-8, a BOM is ignored; header names are stripped).

    Args:
        path: the CSV file.
        allowed: every column the caller understands (must include ``slide``).
        required: columns that must be present (``slide`` always is).

    Returns:
        ``(columns, rows)``: the header's columns in file order and the rows in file order.

    Raises:
        CohortError: a column not in ``allowed`` (the message lists the allowed ones), a
            required column missing, an empty ``slide`` cell, a slide listed twice, a
            repeated column, or no rows.
        OSError: the file cannot be read.
    """
    allowed_text = ", ".join(allowed)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        unknown = [c for c in columns if c not in allowed]
        if unknown:
            raise CohortError(
                f"unknown column(s) {', '.join(map(repr, unknown))} in the cohort; "
                f"allowed: {allowed_text}"
            )
        if len(set(columns)) != len(columns):
            raise CohortError(f"a column appears twice in the cohort header: {columns}")
        for need in ("slide", *required):
            if need not in columns:
                raise CohortError(
                    f"the cohort needs a {need!r} column (has {columns}); allowed: {allowed_text}"
                )
        rows: list[CohortCsvRow] = []
        first_line: dict[str, int] = {}
        for raw in reader:
            line = reader.line_num
            cells = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k}
            slide = cells.get("slide", "")
            if not slide:
                raise CohortError(f"line {line}: empty 'slide' cell")
            if slide in first_line:
                raise CohortError(
                    f"line {line}: slide listed twice (first on line {first_line[slide]})"
                )
            first_line[slide] = line
            rows.append(CohortCsvRow(line, cells))
    if not rows:
        raise CohortError("the cohort lists no slides")
    return columns, rows
