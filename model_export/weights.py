"""Loading checkpoints into the export model, strictly, with readable errors.

Accepted checkpoint shapes (``torch.load(..., weights_only=True)``, so no pickled code
runs): a bare state_dict; ``{"state_dict": ...}``, ``{"model": ...}``,
``{"model_state_dict": ...}`` or ``{"net": ...}`` wrappers (nested ones too); keys
prefixed by ``module.`` (``DataParallel``/DDP) or ``_orig_mod.`` (``torch.compile``).
A key set that does not match exactly raises :class:`~histohelper.errors.WeightsError`
listing missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from histohelper.errors import WeightsError
from histohelper.server.runtime.manifest import WeightFile

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 12


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_weight_file(path: str | os.PathLike[str], role: str) -> WeightFile:
    """The manifest entry for one weight file (base name, sha256, size)."""
    p = Path(path)
    return WeightFile(
        role=role,  # type: ignore[arg-type]
        file_name=p.name,
        sha256=sha256_file(p),
        size_bytes=p.stat().st_size,
    )


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Find the state_dict in a checkpoint object and strip wrapper prefixes.

    Args:
        obj: what ``torch.load`` returned.

    Returns:
        ``{parameter name: tensor}`` with ``module.``/``_orig_mod.`` prefixes removed.

    Raises:
        WeightsError: no state_dict found (e.g. a whole pickled model or a training
            log).
    """
    seen = 0
    while not _is_tensor_dict(obj) and isinstance(obj, Mapping) and seen < 4:
        seen += 1
        for key in _WRAPPER_KEYS:
            if key in obj:
                obj = obj[key]
                break
        else:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:  # a state_dict beside non-tensor entries (e.g. "epoch")
                obj = tensors
                break
            raise WeightsError(
                "checkpoint holds no state_dict: expected a dict of tensors or one wrapped "
                f"under one of {', '.join(repr(k) for k in _WRAPPER_KEYS)}; "
                f"top-level keys are {sorted(map(str, obj))[:_MAX_LISTED]}"
            )
    if not _is_tensor_dict(obj):
        raise WeightsError(
            "checkpoint holds no state_dict (save model.state_dict(), not the model object)"
        )
    out: dict[str, torch.Tensor] = {}
    assert isinstance(obj, Mapping)
    for key, value in obj.items():
        k = key
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if k.startswith(prefix):
                    k = k[len(prefix) :]
                    changed = True
        out[k] = value
    return out


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely (``weights_only=True``) and unwrap it.

    Raises:
        WeightsError: unreadable file, pickled code, or no state_dict inside.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p.name}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all end here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"cannot read weights file {p.name} as a tensor-only checkpoint: {first}"
        ) from None
    return unwrap_state_dict(obj)


def _fmt(keys: list[str]) -> str:
    head = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return head + (f", ... (+{more} more)" if more > 0 else "")


def load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str, hint: str = ""
) -> None:
    """Load ``state`` into ``module`` only if keys and shapes match exactly.

    Args:
        module: the target (e.g. ``model.patch``).
        state: unwrapped state_dict.
        what: name used in the message, e.g. ``"patch network (resnet18)"``.
        hint: extra advice appended when shapes differ (e.g. about ``--patch-classes``).

    Raises:
        WeightsError: message lists missing, unexpected and mis-shaped keys; ``module``
            is left untouched.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f"weights do not fit the {what}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped ({len(misshaped)}): {_fmt(misshaped)}")
        if hint and misshaped:
            lines.append(f"  hint: {hint}")
        raise WeightsError("\n".join(lines))
    casted = {k: state[k].to(dtype=expected[k].dtype) for k in expected}
    module.load_state_dict(casted, strict=True)
