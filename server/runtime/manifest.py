"""The model manifest: the JSON document embedded in every HistoHelper model artifact.

``histohelper.model_export`` writes it; ``histohelper.server.runtime`` loads an artifact
by it alone (patch size, target resolution, normalisation, classes, precisions). It is
stored as the TorchScript extra file :data:`MANIFEST_NAME` (``torch.jit.save(...,
_extra_files=...)``), which lands in the artifact's zip archive at
``<archive>/extra/manifest.json``; :func:`read_manifest` reads it from there with
:mod:`zipfile`, so inspecting a model needs neither torch nor its weights.

This module imports only the standard library, numpy-free pydantic and the core errors.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from histohelper.errors import ModelArtifactError

#: Name of the manifest inside the artifact (a TorchScript extra file).
MANIFEST_NAME = "manifest.json"
#: Name of the MIL-head weights inside the artifact (numpy ``.npz``, float32), so a
#: runtime without torch (ONNX Runtime) can aggregate.
MIL_WEIGHTS_NAME = "mil_head.npz"
#: The manifest format this code writes. 2: the int8 gates are one mapping by engine
#: (:attr:`OnnxInfo.int8_gates`). 3: adds :attr:`Manifest.mil_dropout` and
#: :attr:`Manifest.mil_training` (optional; format 1 and 2 manifests read with their
#: defaults). A runtime that reads only 1 and 2 refuses format 3 by its version,
#: rather than failing on the unknown fields. 4: adds :attr:`Manifest.stain_normalization`
#: (optional).
FORMAT_VERSION = 4
#: The formats this code reads (1: one int8 parity field per engine); others are refused.
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4)
#: Format 1's int8 parity fields -> the engine they gated.
_FORMAT1_GATES = {
    "int8_parity": "onnxruntime",
    "int8_parity_openvino": "openvino",
    "int8_parity_openvino_bf16": "openvino-bf16",
}

Precision = Literal["fp32", "bf16", "fp16"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class Normalisation(_Frozen):
    """Per-channel normalisation applied after scaling uint8 to [0, 1].

    ``x = (pixel / 255 - mean[c]) / std[c]`` for RGB channel ``c``.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class InputSpec(_Frozen):
    """What the artifact's patch entry point takes.

    Attributes:
        layout: ``"NHWC"``: ``[B, H, W, 3]``.
        dtype: ``"uint8"``: raw RGB values 0..255.
        channel_order: ``"RGB"``.
        normalisation_inside: True: the artifact converts to float, scales by 1/255 and
            normalises with ``normalisation`` itself; callers pass raw pixels.
        float_entry: name of the method taking ``[B, 3, H, W]`` float32 already
            normalised input (for callers that normalise themselves).
    """

    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["uint8"] = "uint8"
    channel_order: Literal["RGB"] = "RGB"
    normalisation_inside: bool = True
    float_entry: str = "predict_patches_nchw"


class WeightFile(_Frozen):
    """One weight file that went into the artifact.

    Attributes:
        role: ``"patch"`` (the ResNet18 checkpoint) or ``"mil"`` (the MIL head).
        file_name: base name of the file (never its directory).
        sha256: hex SHA-256 of the file's bytes.
        size_bytes: file size in bytes.
    """

    role: Literal["patch", "mil"]
    file_name: str
    sha256: str
    size_bytes: int


class ParityFigures(_Frozen):
    """How closely one exported path reproduces a reference.

    Attributes:
        reference: what was compared against, e.g. ``"eager fp32"``.
        n_samples: number of patches (or bags) compared.
        max_abs_prob_diff: max |p - p_ref| over all samples and classes.
        max_abs_logit_diff: max |logit - logit_ref|.
        argmax_agreement: fraction (0..1) of samples with the same arg-max class.
        tolerance: the gate on ``max_abs_prob_diff``.
        min_argmax_agreement: the gate on ``argmax_agreement`` (None: not gated).
        passed: whether the gate held.
        checked_on: device the check ran on (``"cpu"``, ``"cuda:0"``).
        data: ``"synthetic(seed=N)"`` (seeded smooth noise), ``"slide:<file name>"``
            or ``"bag(n=N)"``.
        reference_argmax_counts: samples per class under the reference's arg-max: an
            agreement figure means little when every sample falls in one class (as with
            an untrained model); read it together with ``max_abs_prob_diff``.
    """

    reference: str
    n_samples: int
    max_abs_prob_diff: float
    max_abs_logit_diff: float
    argmax_agreement: float
    tolerance: float
    min_argmax_agreement: float | None = None
    passed: bool
    checked_on: str = "cpu"
    data: str = "synthetic"
    reference_argmax_counts: tuple[int, ...] | None = None


class PrecisionVariant(_Frozen):
    """A precision the runtime may run the patch path in.

    The artifact holds one set of fp32 weights; a variant is realised at load time by
    casting the patch network's parameters (the MIL head stays fp32).

    Attributes:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        devices: device types it is meant for (``"cpu"``, ``"cuda"``, ``"mps"``).
        parity: figures against fp32 (None for fp32 itself).
    """

    precision: Precision
    devices: tuple[str, ...]
    parity: ParityFigures | None = None


class OnnxInfo(_Frozen):
    """The optional ONNX export of the patch path, written next to the artifact.

    Attributes:
        file_name: base name of the ``.onnx`` file (same directory as the artifact).
        opset: ONNX opset version.
        inputs: input name -> description.
        outputs: output names, in order.
        checker_passed: ``onnx.checker.check_model`` passed.
        parity: onnxruntime vs eager fp32.
        int8_file_name: base name of the int8 (static QDQ) ``.onnx`` beside it, when
            one was made and passed its ONNX Runtime gate; None otherwise.
        int8_calibration: what the activation ranges were calibrated on.
        int8_gates: engine -> that engine running the int8 model vs eager fp32 on the
            calibration patches (the reduced-precision gate), also when it failed.
            Engines are the backends' ``int8_gate`` names
            (:mod:`histohelper.server.runtime.registry`): ``"onnxruntime"``,
            ``"openvino"`` (OpenVINO picks its own int8 kernels, so it is gated on its
            own; absent when OpenVINO was not installed at export),
            ``"openvino-bf16"`` (the same with the unquantised layers, first
            convolution and heads, in bf16; absent unless OpenVINO's f32 gate passed
            on a CPU with AVX512-BF16 or AMX). Format 1 manifests kept these as the
            fields ``int8_parity``, ``int8_parity_openvino`` and
            ``int8_parity_openvino_bf16``; they are read into this mapping.
    """

    file_name: str
    opset: int
    inputs: dict[str, str]
    outputs: tuple[str, ...]
    checker_passed: bool
    parity: ParityFigures
    int8_file_name: str | None = None
    int8_calibration: str | None = None
    int8_gates: dict[str, ParityFigures] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _format1_gates(cls, data: object) -> object:
        """Read format 1's one field per engine into :attr:`int8_gates`."""
        if not isinstance(data, dict) or not any(k in data for k in _FORMAT1_GATES):
            return data
        data = dict(data)
        gates = dict(data.get("int8_gates") or {})
        for key, engine in _FORMAT1_GATES.items():
            figures = data.pop(key, None)
            if figures is not None:
                gates.setdefault(engine, figures)
        data["int8_gates"] = gates
        return data

    def int8_passed(self, engine: str = "onnxruntime") -> bool:
        """Whether an int8 model exists and passed its parity gate under ``engine``
        (a key of :attr:`int8_gates`; False for an engine never gated)."""
        fig = self.int8_gates.get(engine)
        return self.int8_file_name is not None and fig is not None and fig.passed


class MilTraining(_Frozen):
    """Provenance of a MIL head trained by ``histohelper train-mil``.

    Read from the checkpoint's metadata and, when present, its ``report.json``.

    Attributes:
        cohort_sha256: SHA-256 of the cohort CSV the head was trained on.
        feature_model_hash: artifact hash of the model that produced the features.
        seed: training seed.
        epochs: epochs of the final head.
        dropout: dropout probability during training (also used for MC dropout).
        attention_dim: L of the trained head.
        scheme: cross-validation scheme, e.g. ``"patient-level stratified 5-fold"``
            (None without a report).
        folds: number of validation folds (None without a report).
        n_slides: slides in the cohort (None without a report).
        n_patients: patients in the cohort (None without a report).
        oof_auc: pooled out-of-fold AUC (binary: of the positive class).
        oof_auc_ci95: its 95 % patient-level bootstrap interval ``(low, high)``.
        oof_balanced_accuracy: pooled out-of-fold balanced accuracy.
        oof_balanced_accuracy_ci95: its 95 % bootstrap interval.
        report_sha256: SHA-256 of the ``report.json`` read (None without one).
    """

    cohort_sha256: str | None = None
    feature_model_hash: str | None = None
    seed: int | None = None
    epochs: int | None = None
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    attention_dim: int | None = None
    scheme: str | None = None
    folds: int | None = None
    n_slides: int | None = None
    n_patients: int | None = None
    oof_auc: float | None = None
    oof_auc_ci95: tuple[float, float] | None = None
    oof_balanced_accuracy: float | None = None
    oof_balanced_accuracy_ci95: tuple[float, float] | None = None
    report_sha256: str | None = None


class StainTarget(_Frozen):
    """Target statistics of a stain normalisation method (see
    ``histohelper.server.tiling.stain.StainStats``, which has the same fields).

    Attributes:
        stain_matrix: Macenko: ``[2, 3]`` row-major H and E optical-density vectors.
        max_concentrations: Macenko: 99th-percentile H and E concentrations.
        means: Reinhard: l-alpha-beta channel means.
        stds: Reinhard: l-alpha-beta channel standard deviations.
    """

    stain_matrix: tuple[float, ...] = ()
    max_concentrations: tuple[float, ...] = ()
    means: tuple[float, ...] = ()
    stds: tuple[float, ...] = ()


class StainDeclaration(_Frozen):
    """The stain normalisation the model was trained with (``export --stain-method``).

    The server applies it by default (results say source ``"model"``).

    Attributes:
        method: ``"macenko"``, ``"reinhard"`` or ``"none"``.
        reference: ``"model"``: the target fitted on the export's reference image
            (``export --stain-reference IMG``); ``"published"``: the published default.
        targets: method -> target fitted on the export's reference image, for every
            method (so a request may pick another method with the model's reference).
        reference_sha256: SHA-256 of the reference image file (provenance).
    """

    method: Literal["none", "macenko", "reinhard"]
    reference: Literal["published", "model"] = "published"
    targets: dict[str, StainTarget] = Field(default_factory=dict)
    reference_sha256: str | None = None

    @model_validator(mode="after")
    def _target_present(self) -> StainDeclaration:
        if self.reference == "model" and self.method not in self.targets:
            raise ValueError(f"stain reference 'model' needs a {self.method} target")
        return self


class Manifest(_Frozen):
    """Everything a runtime needs to serve an artifact, and its provenance.

    Attributes:
        format_version: manifest format (:data:`FORMAT_VERSION`).
        model_name: e.g. ``"histohelper-resnet18-gated-mil"``.
        model_version: free-form version string chosen at export.
        architecture: short description of the network.
        patch_classes: names of the C patch classes, index order of the logits.
        slide_classes: names of the K slide classes, index order of the slide logits.
        patch_size_px: H = W of a patch, in pixels at ``target_mpp``.
        target_mpp: resolution patches must be read at, micrometres per pixel (0.01 to 100).
        embedding_dim: D, size of a patch embedding (512 for ResNet18).
        attention_dim: hidden size L of the gated attention.
        cam_size: h = w of the class activation maps (patch_size_px / 32).
        normalisation: mean/std applied inside the artifact.
        input: layout and dtype of the patch entry point.
        methods: exported TorchScript method name -> signature description.
        precisions: available precision variants (fp32 always first).
        weights: weight files used (empty when fully untrained).
        untrained: True when any part was randomly initialised (not for diagnosis).
        untrained_parts: which parts (``"patch"``, ``"mil"``) were random.
        seed: seed of the random initialisation.
        torch_version: torch version at export.
        torchvision_version: torchvision version at export.
        exported_at: ISO-8601 UTC time of export.
        calibration: where the reduced-precision check patches came from.
        parity: TorchScript vs eager fp32 figures for the patch path and aggregation.
        onnx: the ONNX export, if any.
        mil_dropout: dropout probability of the MIL head carried by the artifact
            (``aggregate_mc``, Monte-Carlo dropout); 0: none, MC dropout is refused.
        mil_training: provenance of a trained MIL head (None: untrained, or weights
            made outside ``train-mil``).
        stain_normalization: the stain normalisation the model was trained with
            (None: none declared; the server then applies none by default).
    """

    format_version: int = FORMAT_VERSION
    model_name: str
    model_version: str
    architecture: str = "resnet18 + gated attention MIL (Ilse et al. 2018)"
    patch_classes: tuple[str, ...] = Field(min_length=1)
    slide_classes: tuple[str, ...] = Field(min_length=1)
    patch_size_px: int = Field(gt=0)
    target_mpp: float = Field(ge=0.01, le=100.0)  # the tiler's plausible mpp range
    embedding_dim: int = Field(gt=0)
    attention_dim: int = Field(gt=0)
    cam_size: int = Field(gt=0)
    normalisation: Normalisation
    input: InputSpec = InputSpec()
    methods: dict[str, str] = Field(default_factory=dict)
    precisions: tuple[PrecisionVariant, ...]
    weights: tuple[WeightFile, ...] = ()
    untrained: bool
    untrained_parts: tuple[str, ...] = ()
    seed: int | None = None
    torch_version: str
    torchvision_version: str
    exported_at: str
    calibration: str = "synthetic"
    parity: dict[str, ParityFigures] = Field(default_factory=dict)
    onnx: OnnxInfo | None = None
    mil_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    mil_training: MilTraining | None = None
    stain_normalization: StainDeclaration | None = None

    def precision_names(self) -> tuple[str, ...]:
        """Names of the precisions whose gate passed (fp32 always)."""
        return tuple(v.precision for v in self.precisions if v.parity is None or v.parity.passed)

    def to_json(self) -> str:
        """Serialise as indented JSON (what goes into the artifact)."""
        return self.model_dump_json(indent=2)


def parse_manifest(text: str | bytes) -> Manifest:
    """Parse and validate manifest JSON.

    Any of :data:`READABLE_FORMAT_VERSIONS` is read into the current format
    (:data:`FORMAT_VERSION`): the returned manifest has the current layout and
    ``format_version``.

    Args:
        text: the JSON document.

    Returns:
        The validated manifest.

    Raises:
        ModelArtifactError: not JSON, wrong format version, or fields invalid.
    """
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelArtifactError(f"model manifest is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelArtifactError("model manifest is not a JSON object")
    version = raw.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        readable = ", ".join(map(str, READABLE_FORMAT_VERSIONS))
        raise ModelArtifactError(
            f"model manifest format_version {version!r} is not supported "
            f"(this runtime reads {readable})"
        )
    try:
        # Read as the current format: older layouts are converted by the validators.
        return Manifest.model_validate({**raw, "format_version": FORMAT_VERSION})
    except ValidationError as exc:
        raise ModelArtifactError(f"model manifest is invalid: {exc}") from None


def read_artifact_member(path: str | os.PathLike[str], name: str) -> bytes:
    """Read one extra file from a TorchScript artifact without loading it.

    TorchScript archives are zip files whose extra files live at
    ``<archive name>/extra/<name>``.

    Args:
        path: the artifact (``.pt``).
        name: extra-file name, e.g. :data:`MANIFEST_NAME`.

    Returns:
        The member's bytes.

    Raises:
        ModelArtifactError: the file is missing, not a TorchScript archive, or lacks
            the member.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelArtifactError("model artifact not found")
    try:
        with zipfile.ZipFile(p) as zf:
            suffix = f"/extra/{name}"
            members = [n for n in zf.namelist() if n.endswith(suffix) and n.count("/") == 2]
            if not members:
                raise ModelArtifactError(f"model artifact has no embedded {name}")
            return zf.read(members[0])
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelArtifactError(f"model artifact is not a TorchScript archive: {exc}") from None


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read the manifest embedded in an artifact, without loading weights or torch.

    Args:
        path: the TorchScript artifact written by ``histohelper export``.

    Returns:
        The validated :class:`Manifest`.

    Raises:
        ModelArtifactError: missing or unreadable artifact, or invalid manifest.
    """
    return parse_manifest(read_artifact_member(path, MANIFEST_NAME))
