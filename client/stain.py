"""Stain normalisation on the client: the names a request uses and what a result says
was applied (``AppliedStainNormalization``). numpy-free; no torch, no OpenCV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from histohelper.v1 import slide_analysis_pb2 as pb

StainMethodName = Literal["none", "macenko", "reinhard"]
StainReferenceName = Literal["published", "model", "server"]

#: Request names -> wire enum values.
STAIN_METHODS: dict[str, pb.StainMethod] = {
    "none": pb.STAIN_METHOD_NONE,
    "macenko": pb.STAIN_METHOD_MACENKO,
    "reinhard": pb.STAIN_METHOD_REINHARD,
}
STAIN_REFERENCES: dict[str, pb.StainReference] = {
    "published": pb.STAIN_REFERENCE_PUBLISHED,
    "model": pb.STAIN_REFERENCE_MODEL,
    "server": pb.STAIN_REFERENCE_SERVER,
}
_METHOD_NAMES = {v: k for k, v in STAIN_METHODS.items()} | {pb.STAIN_METHOD_VAHADANE: "vahadane"}
_REFERENCE_NAMES = {v: k for k, v in STAIN_REFERENCES.items()}


def stain_request(
    method: StainMethodName | None, reference: StainReferenceName | None
) -> pb.StainNormalization | None:
    """The wire ``StainNormalization`` of a request (None when both are unset: the
    model's declared normalisation, else none).

    Raises:
        ValueError: an unknown method or reference name, or a reference with method
            ``"none"`` (nothing to apply it to).
    """
    if method is None and reference is None:
        return None
    if method == "none" and reference is not None:
        raise ValueError(
            "stain normalisation none applies no stain reference: leave the reference "
            "unset, or name a method (macenko, reinhard)"
        )
    if method is not None and method not in STAIN_METHODS:
        raise ValueError(f"stain method must be one of {sorted(STAIN_METHODS)}, got {method!r}")
    if reference is not None and reference not in STAIN_REFERENCES:
        raise ValueError(
            f"stain reference must be one of {sorted(STAIN_REFERENCES)}, got {reference!r}"
        )
    return pb.StainNormalization(
        method=STAIN_METHODS[method] if method else pb.STAIN_METHOD_UNSPECIFIED,
        reference=STAIN_REFERENCES[reference] if reference else pb.STAIN_REFERENCE_UNSPECIFIED,
    )


@dataclass(frozen=True, slots=True)
class AppliedStain:
    """The stain normalisation the server applied to a call's patches.

    Attributes:
        method: ``"none"``, ``"macenko"`` or ``"reinhard"`` (``"none"`` also when a
            requested fit failed: see ``warning``).
        reference: ``"published"``, ``"model"``, ``"server"``, or ``""`` for none.
        source: why: ``"request"``, ``"model"`` (the model's manifest declares it) or
            ``"default"``.
        fitted_stain_matrix: Macenko: the slide's ``[2, 3]`` H and E optical-density
            vectors, row-major (6 floats); empty otherwise.
        fitted_max_concentrations: Macenko: the slide's 99th-percentile H and E
            concentrations.
        fitted_means: Reinhard: the slide's l-alpha-beta means (3 floats).
        fitted_stds: Reinhard: the slide's l-alpha-beta standard deviations.
        warning: why nothing was applied although asked (too few tissue pixels).
    """

    method: str = "none"
    reference: str = ""
    source: str = ""
    fitted_stain_matrix: tuple[float, ...] = ()
    fitted_max_concentrations: tuple[float, ...] = ()
    fitted_means: tuple[float, ...] = ()
    fitted_stds: tuple[float, ...] = ()
    warning: str = ""

    @classmethod
    def from_proto(cls, msg: pb.AppliedStainNormalization) -> AppliedStain:
        return cls(
            method=_METHOD_NAMES.get(msg.method, "none"),
            reference=_REFERENCE_NAMES.get(msg.reference, ""),
            source=msg.source,
            fitted_stain_matrix=tuple(msg.fitted_stain_matrix),
            fitted_max_concentrations=tuple(msg.fitted_max_concentrations),
            fitted_means=tuple(msg.fitted_means),
            fitted_stds=tuple(msg.fitted_stds),
            warning=msg.warning,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON form for ``summary.json`` (the fitted statistics only when present)."""
        out: dict[str, Any] = {
            "method": self.method,
            "reference": self.reference,
            "source": self.source,
        }
        for name in ("fitted_stain_matrix", "fitted_max_concentrations", "fitted_means"):
            if getattr(self, name):
                out[name] = list(getattr(self, name))
        if self.fitted_stds:
            out["fitted_stds"] = list(self.fitted_stds)
        if self.warning:
            out["warning"] = self.warning
        return out

    def describe(self) -> str:
        """One line for people, e.g. ``"macenko to the published reference (asked by
        the request)"`` or ``"none"``."""
        why = {"request": "asked by the request", "model": "the model's declared"}.get(
            self.source, "default"
        )
        if self.method == "none":
            return f"none ({self.warning})" if self.warning else "none"
        return f"{self.method} to the {self.reference} reference ({why})"
