"""Names of a model's parts, as the manifest's ``untrained_parts`` records them.

``histohelper export`` lists each part it left at the seeded random initialisation
(``"patch"``: the ResNet18 patch classifier; ``"mil"``: the gated-attention MIL slide
head). The server's start-up log, the client's console lines and the CLI's ``info``
say which parts are untrained with the labels here. Stdlib only: the server and the
thin client both import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

#: Manifest part name -> what a reader is told.
PART_LABELS: Final[dict[str, str]] = {
    "patch": "patch classifier",
    "mil": "MIL slide head",
}


def describe_untrained(parts: Iterable[str]) -> str:
    """Human-readable list of untrained parts, e.g. ``"patch classifier, MIL slide head"``.

    Args:
        parts: manifest part names (``untrained_parts``); unknown names are shown as given.

    Returns:
        The labels joined with ``", "``, or ``"unspecified parts"`` when ``parts`` is
        empty (an untrained manifest that does not say which part).
    """
    labels = [PART_LABELS.get(p, p) for p in parts]
    return ", ".join(labels) if labels else "unspecified parts"


def untrained_warning(parts: Iterable[str]) -> str:
    """One sentence for a model with untrained parts: which, and what that voids.

    Args:
        parts: manifest part names (``untrained_parts``), possibly empty.

    Returns:
        E.g. ``"untrained (seeded random initialisation): MIL slide head; the slide
        prediction and attention mean nothing"``.
    """
    parts = tuple(parts)
    if parts == ("mil",):
        voided = "the slide prediction and attention mean nothing"
    else:
        voided = "its predictions mean nothing"
    return f"untrained (seeded random initialisation): {describe_untrained(parts)}; {voided}"
