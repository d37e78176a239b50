"""Freeze the HistoHelper model into one TorchScript artifact (and ONNX), with a manifest.

The artifact is ``torch.jit.script`` of :class:`~.modules.HistoHelperModel` (scripting,
not tracing: no batch, bag or image size is baked in), saved with two extra files:
``manifest.json`` (:class:`~histohelper.server.runtime.manifest.Manifest`) and
``mil_head.npz`` (the MIL head's float32 weights, so an ONNX Runtime server can
aggregate without torch). Everything is written to temporary files in the output
directory and renamed into place only after every gate passed: a failed export leaves
no artifact behind.

Gates (each raises :class:`~histohelper.errors.ParityError`):

* TorchScript vs eager fp32 on a fixed seeded batch: max |Δ probability| <= 1e-5,
  both for the artifact as saved and as the runtime serves it (frozen, channels-last);
  same for the MIL aggregation on a fixed bag.
* ONNX (optional): ``onnx.checker`` passes and onnxruntime matches eager within 1e-4.

Reduced-precision variants (bf16, fp16) are checked against eager fp32 on calibration
patches (a slide, or seeded synthetic ones): argmax agreement >= 99 % and max
|Δ probability| <= 0.02. A variant that misses its gate is recorded as failed (the
runtime never picks it) and a warning is issued; ``strict_variants=True`` makes it an
error instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torchvision

from histohelper.errors import InvalidOptionsError, ParityError
from histohelper.server.runtime.manifest import (
    MANIFEST_NAME,
    MIL_WEIGHTS_NAME,
    InputSpec,
    Manifest,
    Normalisation,
    OnnxInfo,
    ParityFigures,
    PrecisionVariant,
    StainDeclaration,
    StainTarget,
    WeightFile,
    read_manifest,
)
from histohelper.server.tiling.stain import (
    STAIN_METHODS,
    StainFitError,
    read_reference_image,
    reference_targets,
)

from .calibration import CalibrationSet, slide_patches, synthetic_patches
from .mil_provenance import MilHeadInfo, read_mil_head_info
from .modules import IMAGENET_MEAN, IMAGENET_STD, METHODS, HistoHelperModel
from .weights import describe_weight_file, load_strict, read_checkpoint

log = logging.getLogger(__name__)

#: Gate for TorchScript vs eager, fp32: max |Δ probability|.
FP32_PROB_TOL = 1e-5
#: Gate for onnxruntime vs eager, fp32: max |Δ probability| (and logits are reported).
ONNX_PROB_TOL = 1e-4
#: Gates for reduced precision vs fp32 on calibration patches.
VARIANT_PROB_TOL = 0.02
VARIANT_MIN_AGREEMENT = 0.99
#: Devices each precision is meant for (the runtime also checks the hardware).
VARIANT_DEVICES = {"fp32": ("cpu", "cuda", "mps"), "bf16": ("cpu", "cuda"), "fp16": ("cuda", "mps")}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRESERVED = ["predict_patches_uint8", "predict_patches_nchw", "aggregate"]

DEFAULT_MODEL_NAME = "histohelper-resnet18-gated-mil"


class UntrainedModelWarning(UserWarning):
    """The exported model (or part of it) has random weights: not for diagnosis."""


def _probs(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=dim)


def compare(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    reference: str,
    tolerance: float,
    min_agreement: float | None,
    data: str,
    checked_on: str = "cpu",
) -> ParityFigures:
    """Parity figures of ``logits`` against ``ref_logits`` (``[B, C]`` or ``[K]``).

    Probabilities are the softmax over the last dimension computed in float64, so the
    figures measure the model and not the comparison.
    """
    lg = logits.detach().double().cpu().reshape(-1, logits.shape[-1])
    rf = ref_logits.detach().double().cpu().reshape(-1, ref_logits.shape[-1])
    prob_diff = float((_probs(lg) - _probs(rf)).abs().max())
    logit_diff = float((lg - rf).abs().max())
    agreement = float((lg.argmax(1) == rf.argmax(1)).double().mean())
    passed = prob_diff <= tolerance and (min_agreement is None or agreement >= min_agreement)
    counts = torch.bincount(rf.argmax(1), minlength=rf.shape[1]).tolist()
    return ParityFigures(
        reference=reference,
        n_samples=int(lg.shape[0]),
        max_abs_prob_diff=prob_diff,
        max_abs_logit_diff=logit_diff,
        argmax_agreement=agreement,
        tolerance=tolerance,
        min_argmax_agreement=min_agreement,
        passed=passed,
        checked_on=checked_on,
        data=data,
        reference_argmax_counts=tuple(int(c) for c in counts),
    )


def prepare_for_serving(
    path: str | os.PathLike[str], precision: str, device: str = "cpu", channels_last: bool = True
) -> torch.jit.ScriptModule:
    """Load an artifact the way ``histohelper.server.runtime`` serves it.

    Mirrors ``server.runtime.torchscript.load_torchscript`` (which model_export may not
    import): cast the patch network to ``precision``, channels-last, ``torch.jit.freeze``.
    """
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    if precision != "fp32":
        module.patch.to(_DTYPES[precision])
    if channels_last:
        module.patch.to(memory_format=torch.channels_last)
    return torch.jit.freeze(module, preserved_attrs=_PRESERVED)


def run_patches(
    fn: object, images: npt.NDArray[np.uint8], batch: int = 64, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``fn.predict_patches_uint8`` over ``images`` in chunks, with CAMs.

    Returns:
        ``(logits [B, C], embeddings [B, D], cams [B, C, h, w])``, float32 on the CPU.
    """
    outs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device)
            lg, emb, cams = fn.predict_patches_uint8(x, True)  # type: ignore[attr-defined]
            outs.append((lg.float().cpu(), emb.float().cpu(), cams.float().cpu()))
    return tuple(torch.cat([o[k] for o in outs]) for k in range(3))  # type: ignore[return-value]


def fixed_bag(n: int, dim: int, seed: int) -> torch.Tensor:
    """A seeded bag of ``n`` non-negative embeddings ``[n, dim]`` (like post-ReLU GAP)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g).abs_()


def _check_variant_device(precision: str) -> str:
    """Device to check a variant on: CUDA when present, else the CPU (numerically
    the same formats; the CPU result stands in for CUDA/MPS and is labelled ``cpu``)."""
    if torch.cuda.is_available() and precision in ("fp16", "bf16"):
        return "cuda:0"
    return "cpu"


def _mil_npz(model: HistoHelperModel) -> bytes:
    buf = io.BytesIO()
    arrays = {k: v.detach().float().cpu().numpy() for k, v in model.mil.state_dict().items()}
    np.savez(buf, **arrays)
    return buf.getvalue()


class _OnnxPatchPath(torch.nn.Module):
    """uint8 NHWC -> (logits, embeddings, cams), for the ONNX export."""

    def __init__(self, model: HistoHelperModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, emb, cams = self.model.predict_patches_uint8(images, True)
        assert cams is not None
        return logits, emb, cams


def export_onnx(
    model: HistoHelperModel,
    out_path: Path,
    *,
    patch_size_px: int,
    opset: int,
    check_images: npt.NDArray[np.uint8],
    data: str,
) -> OnnxInfo:
    """Export the patch path to ONNX and gate it against eager fp32.

    Input ``images``: uint8 ``[batch, S, S, 3]`` RGB (dynamic batch); outputs
    ``logits [batch, C]``, ``embeddings [batch, 512]``, ``cams [batch, C, S/32, S/32]``.
    Uses ``torch.onnx.export(dynamo=True)``; the check is ``onnx.checker.check_model``
    (full check) and onnxruntime CPU vs eager within :data:`ONNX_PROB_TOL`.

    Raises:
        ParityError: the checker fails or onnxruntime differs too much.
    """
    import onnx
    import onnxruntime as ort

    wrapper = _OnnxPatchPath(model).eval()
    example = torch.from_numpy(check_images[:2].copy())
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(out_path),
            input_names=["images"],
            output_names=["logits", "embeddings", "cams"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"images": {0: batch}},
            external_data=False,
            verbose=False,
        )
    try:
        onnx.checker.check_model(str(out_path), full_check=True)
    except Exception as exc:
        raise ParityError(f"ONNX export failed onnx.checker: {exc}") from None
    proto = onnx.load(str(out_path), load_external_data=False)
    real_opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    sess_opts = ort.SessionOptions()
    sess = ort.InferenceSession(str(out_path), sess_opts, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = model.predict_patches_uint8(torch.from_numpy(check_images.copy()), True)
    ort_logits, ort_emb, ort_cams = sess.run(None, {"images": check_images})
    figures = compare(
        torch.from_numpy(ort_logits),
        ref[0],
        reference="eager fp32",
        tolerance=ONNX_PROB_TOL,
        min_agreement=None,
        data=data,
    )
    emb_diff = float(np.abs(ort_emb - ref[1].numpy()).max())
    cam_diff = float(np.abs(ort_cams - ref[2].numpy()).max())  # type: ignore[union-attr]
    log.info("onnx parity: %s; embeddings %.3g, cams %.3g", figures, emb_diff, cam_diff)
    if not figures.passed:
        raise ParityError(
            f"onnxruntime differs from eager: max |Δp| {figures.max_abs_prob_diff:.3g} > "
            f"{ONNX_PROB_TOL:g}"
        )
    return OnnxInfo(
        file_name=out_path.name,
        opset=real_opset,
        inputs={"images": f"uint8 [batch,{patch_size_px},{patch_size_px},3] RGB"},
        outputs=("logits", "embeddings", "cams"),
        checker_passed=True,
        parity=figures,
    )


def quantize_onnx_int8(
    fp32_path: Path,
    out_path: Path,
    pre_path: Path,
    *,
    calib: CalibrationSet,
    ref_logits: torch.Tensor,
) -> ParityFigures:
    """Quantise the fp32 ONNX patch path to int8 (static QDQ) and gate it.

    ONNX Runtime static quantisation (``quantize_static``, QDQ format): convolution
    weights int8 per output channel, activations uint8 with MinMax ranges calibrated
    on the even-indexed calibration patches. The first convolution (raw normalised
    pixels), the fc head and the CAM einsum stay fp32: with them quantised the
    probabilities moved by 0.05 on CMU-1 patches, beyond the gate. The gate is the
    reduced-precision one (:data:`VARIANT_PROB_TOL`, :data:`VARIANT_MIN_AGREEMENT`)
    against eager fp32 on all calibration patches. On CPUs with VNNI (AVX512-VNNI /
    AVX-VNNI) ONNX Runtime runs it faster than fp32 ONNX (benchmarks/RESULTS.md).

    Returns:
        The parity figures (``passed`` tells whether it may be served).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=True)
    graph = onnx.load(str(pre_path), load_external_data=False).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    keep_fp32 = convs[:1] + [n.name for n in graph.node if n.op_type in ("Gemm", "Einsum")]
    images = calib.images
    chunks = [images[i : i + 16] for i in range(0, len(images), 16)]
    even = [c[::2] for c in chunks if len(c[::2])]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter({"images": np.ascontiguousarray(c)} for c in even)

        def get_next(self) -> dict[str, npt.NDArray[np.uint8]] | None:
            return next(self._it, None)

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantize_static(
            str(pre_path),
            str(out_path),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=keep_fp32,
        )
    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    fig = _gate_int8(sess, calib, ref_logits, checked_on="cpu")
    log.info("onnx int8 vs fp32: %s", fig)
    return fig


def _gate_int8(
    session: object, calib: CalibrationSet, ref_logits: torch.Tensor, *, checked_on: str
) -> ParityFigures:
    """The reduced-precision gate of an int8 session (``run(names, feeds)``) against
    eager fp32 logits on every calibration patch, in batches of 64."""
    images = calib.images
    logits = np.concatenate(
        [
            session.run(  # type: ignore[attr-defined]
                ["logits"], {"images": np.ascontiguousarray(images[i : i + 64])}
            )[0]
            for i in range(0, len(images), 64)
        ]
    )
    return compare(
        torch.from_numpy(logits),
        ref_logits,
        reference="eager fp32",
        tolerance=VARIANT_PROB_TOL,
        min_agreement=VARIANT_MIN_AGREEMENT,
        data=calib.source,
        checked_on=checked_on,
    )


def gate_openvino_int8(
    int8_path: Path,
    *,
    calib: CalibrationSet,
    ref_logits: torch.Tensor,
    rest_precision: str = "f32",
) -> ParityFigures | None:
    """Gate the int8 ONNX model as OpenVINO runs it (the server's fastest CPU engine).

    OpenVINO (https://docs.openvino.ai) compiles the same QDQ model with its own int8
    kernels, so its outputs differ from ONNX Runtime's; the server's ``openvino``
    backend serves int8 only when this gate passed. Same gate and patches as
    :func:`quantize_onnx_int8`, compiled exactly as the server compiles it.

    Args:
        int8_path: the int8 ``.onnx`` file.
        calib: the calibration patches (the gate runs on all of them).
        ref_logits: eager fp32 logits of those patches.
        rest_precision: precision of the unquantised layers (first convolution,
            heads): ``"f32"``, or ``"bf16"`` (gated only where this CPU has
            AVX512-BF16 or AMX; None is returned elsewhere).

    Returns:
        The parity figures, or None when OpenVINO is not installed (or bf16 is asked
        on a CPU without it).
    """
    from histohelper.server.runtime.cpu import cpu_has_bf16
    from histohelper.server.runtime.openvino import (
        compile_onnx,
        openvino_available,
        openvino_version,
    )

    if not openvino_available() or (rest_precision == "bf16" and not cpu_has_bf16()):
        return None
    session = compile_onnx(int8_path, num_threads=None, rest_precision=rest_precision)
    where = f"cpu, openvino {openvino_version()}"
    if rest_precision != "f32":
        where += f", unquantised layers {rest_precision}"
    fig = _gate_int8(session, calib, ref_logits, checked_on=where)
    log.info("onnx int8 under openvino (rest %s) vs fp32: %s", rest_precision, fig)
    return fig


def _default_file_mode() -> int:
    """0o666 minus the process umask (mkstemp creates 0o600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _validate_classes(names: Sequence[str], what: str) -> tuple[str, ...]:
    out = tuple(str(n).strip() for n in names)
    if not out or any(not n for n in out):
        raise InvalidOptionsError(f"{what} must be a non-empty list of non-empty names")
    if len(set(out)) != len(out):
        raise InvalidOptionsError(f"{what} has duplicate names: {list(out)}")
    return out


@dataclass(frozen=True)
class ExportOptions:
    """What to export and which gates to run (``histohelper export``'s flags).

    Attributes:
        weights: torchvision-style resnet18 checkpoint whose ``fc`` has
            ``len(patch_classes)`` outputs (wrappers and ``module.`` prefixes accepted).
            None: seeded random init, ``untrained: true`` and an
            :class:`UntrainedModelWarning`.
        mil_weights: state_dict of the MIL head (keys ``attention_V.0.*``,
            ``attention_U.0.*``, ``attention_weights.*``, ``classifier.*``), or
            ``train-mil``'s checkpoint, whose slide classes, dropout and training
            provenance (with its ``report.json``) go into the manifest. None: random.
        mil_report: ``train-mil``'s ``report.json`` for the manifest's provenance; None:
            the one beside ``mil_weights`` when there is one.
        patch_classes: C patch class names, in logit order.
        slide_classes: K slide class names as given; None: the MIL checkpoint's
            (``train-mil``), else the same as ``patch_classes``. Given together with a
            ``train-mil`` checkpoint, they must equal its classes. The resolved names
            are ``slide_class_names`` (set on construction).
        model_name: manifest ``model_name``.
        model_version: manifest ``model_version``.
        patch_size_px: S, a multiple of 32 (CAMs are S/32).
        target_mpp: micrometres per pixel at which patches must be read.
        attention_dim: L of the gated attention.
        mean: normalisation mean (of pixel / 255), RGB.
        std: normalisation std, RGB.
        seed: seed of the random init and of the fixed check batches.
        variants: reduced precisions to check and offer: subset of ``("bf16",
            "fp16")``; ``()`` for fp32 only.
        calibration_slide: slide for the variant and int8 checks, read through the
            server's tiler (:func:`~.calibration.slide_patches`); None: seeded
            synthetic patches. Recorded in the manifest as ``calibration``.
        calibration_patches: at most this many calibration patches.
        onnx: also export the patch path to ONNX and gate it.
        onnx_int8: also quantise that ONNX model to int8 (static QDQ, calibrated on the
            calibration patches; needs ``onnx``), written as ``<out>.int8.onnx`` when it
            passes the reduced-precision gate (see :func:`quantize_onnx_int8`), then
            gated under every engine of :data:`INT8_GATES`.
        onnx_opset: ONNX opset (>= 17).
        parity_batch: patches in the fixed fp32 parity batch.
        check_served: also gate the frozen channels-last module the runtime serves.
        strict_variants: a variant (or int8) missing its gate fails the export.
        stain_method: the stain normalisation the model was trained with
            (``"none"``, ``"macenko"``, ``"reinhard"``), declared in the manifest so the
            server applies it by default.
        stain_reference: the reference image of that normalisation (PNG/JPEG/TIFF);
            every method's target is fitted on it and recorded. None: the published
            default reference.

    Raises:
        InvalidOptionsError: inconsistent options (on construction).
    """

    weights: str | os.PathLike[str] | None = None
    mil_weights: str | os.PathLike[str] | None = None
    mil_report: str | os.PathLike[str] | None = None
    patch_classes: Sequence[str] = ("benign", "malignant")
    slide_classes: Sequence[str] | None = None
    model_name: str = DEFAULT_MODEL_NAME
    model_version: str = "0.1.0"
    patch_size_px: int = 224
    target_mpp: float = 0.5
    attention_dim: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    seed: int = 0
    variants: Sequence[str] = ("bf16", "fp16")
    calibration_slide: str | os.PathLike[str] | None = None
    calibration_patches: int = 256
    onnx: bool = False
    onnx_int8: bool = False
    onnx_opset: int = 18
    parity_batch: int = 8
    check_served: bool = True
    strict_variants: bool = False
    stain_method: str = "none"
    stain_reference: str | os.PathLike[str] | None = None
    mil_info: MilHeadInfo = field(init=False, repr=False, compare=False)
    slide_class_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p_classes = _validate_classes(self.patch_classes, "patch classes")
        info = MilHeadInfo(None, 0.0, None)
        if self.mil_weights is not None:
            info = read_mil_head_info(self.mil_weights, self.mil_report)
        elif self.mil_report is not None:
            raise InvalidOptionsError("a MIL report needs the MIL weights it describes")
        object.__setattr__(self, "mil_info", info)
        given = self.slide_classes
        if (
            given
            and info.slide_classes is not None
            and _validate_classes(given, "slide classes") != info.slide_classes
        ):
            raise InvalidOptionsError(
                f"slide classes {list(given)} differ from the MIL checkpoint's "
                f"{list(info.slide_classes)} (train-mil's logit order); omit "
                "--slide-classes to use the checkpoint's"
            )
        trained_l = info.training.attention_dim if info.training is not None else None
        if trained_l is not None and trained_l != self.attention_dim:
            raise InvalidOptionsError(
                f"the MIL checkpoint's attention dim is {trained_l}, not {self.attention_dim}; "
                f"pass --attention-dim {trained_l}"
            )
        s_classes = _validate_classes(
            self.slide_classes or info.slide_classes or p_classes, "slide classes"
        )
        object.__setattr__(self, "patch_classes", p_classes)
        # slide_classes stays as given (None: resolved again by dataclasses.replace with
        # other MIL weights); the resolved names are slide_class_names.
        object.__setattr__(self, "slide_class_names", s_classes)
        object.__setattr__(self, "variants", tuple(self.variants))
        if self.patch_size_px < 32 or self.patch_size_px % 32:
            raise InvalidOptionsError(
                f"patch size must be a multiple of 32 px, got {self.patch_size_px}"
            )
        if self.target_mpp <= 0:
            raise InvalidOptionsError(f"target mpp must be > 0, got {self.target_mpp}")
        bad = [v for v in self.variants if v not in ("bf16", "fp16")]
        if bad:
            raise InvalidOptionsError(f"unknown precision variants {bad} (choose from bf16, fp16)")
        if self.onnx_int8 and not self.onnx:
            raise InvalidOptionsError("onnx_int8 needs onnx=True")
        if self.onnx and self.onnx_opset < 17:
            raise InvalidOptionsError(f"ONNX opset must be >= 17, got {self.onnx_opset}")
        if self.stain_method not in STAIN_METHODS:
            raise InvalidOptionsError(
                f"unknown stain method {self.stain_method!r} "
                f"(choose from {', '.join(STAIN_METHODS)})"
            )
        if self.stain_reference is not None and self.stain_method == "none":
            raise InvalidOptionsError("a stain reference image needs a stain method")

    @property
    def calibrates(self) -> bool:
        """Whether any gate needs calibration patches (variants or int8)."""
        return bool(self.variants) or self.onnx_int8


@dataclass(frozen=True)
class Int8Gate:
    """The export gate of one engine that may serve the int8 ONNX model.

    Attributes:
        engine: key in ``manifest.onnx.int8_gates``; the serving backend's
            ``int8_gate`` (:mod:`histohelper.server.runtime.registry`).
        after: engine whose gate must have passed first (None: ONNX Runtime's own,
            which decides whether the int8 file is written at all).
        run: ``(int8_path, calib, ref_logits) -> figures``, or None where the engine
            cannot run here (not installed, or the CPU lacks the instructions).
    """

    engine: str
    after: str | None
    run: Callable[[Path, CalibrationSet, torch.Tensor], ParityFigures | None]


#: Gates run on the int8 model after ONNX Runtime's passed, in order; a new backend
#: serving int8 adds its row here.
INT8_GATES = (
    Int8Gate("openvino", None, lambda p, c, r: gate_openvino_int8(p, calib=c, ref_logits=r)),
    Int8Gate(
        "openvino-bf16",
        "openvino",
        lambda p, c, r: gate_openvino_int8(p, calib=c, ref_logits=r, rest_precision="bf16"),
    ),
)


@dataclass(frozen=True)
class _BuiltModel:
    model: HistoHelperModel
    weight_files: tuple[WeightFile, ...]
    untrained_parts: tuple[str, ...]


def build_model(opts: ExportOptions) -> _BuiltModel:
    """The eager model with its checkpoints loaded (random where none), eval mode,
    patch network channels-last. Nothing is written.

    Raises:
        WeightsError: a checkpoint is unreadable or does not fit.
    """
    p_classes, s_classes = tuple(opts.patch_classes), opts.slide_class_names
    torch.manual_seed(opts.seed)
    model = HistoHelperModel(
        len(p_classes),
        len(s_classes),
        opts.attention_dim,
        opts.mean,
        opts.std,
        mil_dropout=opts.mil_info.dropout,
    )
    weight_files: list[WeightFile] = []
    untrained_parts: list[str] = []
    if opts.weights is not None:
        load_strict(
            model.patch,
            read_checkpoint(opts.weights),
            what=f"patch network (torchvision resnet18 with a {len(p_classes)}-class fc)",
            hint=(
                f"the patch head has {len(p_classes)} classes ({', '.join(p_classes)}); "
                "pass --patch-classes with one name per fc output of the checkpoint"
            ),
        )
        weight_files.append(describe_weight_file(opts.weights, "patch"))
    else:
        untrained_parts.append("patch")
    if opts.mil_weights is not None:
        load_strict(
            model.mil,
            read_checkpoint(opts.mil_weights),
            what=(
                f"gated attention MIL head (D=512, L={opts.attention_dim}, "
                f"K={len(s_classes)} slide classes)"
            ),
            hint="check --slide-classes and --attention-dim against the MIL checkpoint",
        )
        weight_files.append(describe_weight_file(opts.mil_weights, "mil"))
    else:
        untrained_parts.append("mil")
    model.eval()
    # The uint8 NHWC entry permutes to channels-last strides; weights in channels-last
    # too keep oneDNN on its fast path (saved strides survive torch.jit.save/load):
    # measured 16 -> 43 patches/s (batch 64, 2 cores) for the artifact as loaded.
    model.patch.to(memory_format=torch.channels_last)
    return _BuiltModel(model, tuple(weight_files), tuple(untrained_parts))


def calib_source(opts: ExportOptions) -> str:
    """Where :func:`_calibration` takes its patches from, in words."""
    if not opts.calibrates:
        return "none needed"
    if opts.calibration_slide is not None:
        return f"up to {opts.calibration_patches} from the calibration slide"
    return f"{min(opts.calibration_patches, 64)} synthetic"


def _calibration(opts: ExportOptions) -> CalibrationSet:
    """The calibration patches: the slide's through the server's tiler, or synthetic
    (none when no gate needs them)."""
    if opts.calibration_slide is not None and opts.calibrates:
        return slide_patches(
            opts.calibration_slide,
            size_px=opts.patch_size_px,
            target_mpp=opts.target_mpp,
            max_patches=opts.calibration_patches,
        )
    n = min(opts.calibration_patches, 64) if opts.calibrates else 0
    return synthetic_patches(n, opts.patch_size_px, opts.seed)


def _manifest_fields(
    opts: ExportOptions, built: _BuiltModel, calib: CalibrationSet
) -> dict[str, object]:
    """The manifest's fields that do not depend on the gates."""
    untrained = bool(built.untrained_parts)
    return {
        "model_name": opts.model_name,
        "model_version": opts.model_version,
        "patch_classes": opts.patch_classes,
        "slide_classes": opts.slide_class_names,
        "patch_size_px": opts.patch_size_px,
        "target_mpp": opts.target_mpp,
        "embedding_dim": 512,
        "attention_dim": opts.attention_dim,
        "cam_size": opts.patch_size_px // 32,
        "normalisation": Normalisation(mean=opts.mean, std=opts.std),
        "input": InputSpec(),
        "methods": METHODS,
        "weights": built.weight_files,
        "untrained": untrained,
        "untrained_parts": built.untrained_parts,
        "seed": opts.seed if untrained else None,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "calibration": calib.source if opts.calibrates else "none",
        "mil_dropout": opts.mil_info.dropout,
        "mil_training": opts.mil_info.training,
        "stain_normalization": stain_declaration(opts.stain_method, opts.stain_reference),
    }


def stain_declaration(
    method: str, reference: str | os.PathLike[str] | None
) -> StainDeclaration | None:
    """The manifest's stain declaration: the method the model was trained with and its
    reference (every method's target fitted on the reference image, with the image's
    SHA-256), or None for ``"none"`` without a reference.

    Raises:
        InvalidOptionsError: the reference image cannot be read or has too little
            stained tissue to fit.
    """
    if method == "none" and reference is None:
        return None
    if reference is None:
        return StainDeclaration(method=method, reference="published")  # type: ignore[arg-type]
    path = Path(reference)
    try:
        targets = reference_targets(read_reference_image(path))
    except StainFitError as exc:
        raise InvalidOptionsError(f"the stain reference image is unusable: {exc}") from None
    return StainDeclaration(
        method=method,  # type: ignore[arg-type]
        reference="model",
        targets={k: StainTarget(**dataclasses.asdict(v)) for k, v in targets.items()},
        reference_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


class _Staging:
    """Temporary files beside the artifact, renamed into place only by :meth:`publish`
    and removed on exit otherwise (a failed export leaves nothing behind)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._files: list[Path] = []

    def tmp(self, suffix: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=suffix, dir=self.out.parent)
        os.close(fd)
        path = Path(name)
        self._files.append(path)
        return path

    def publish(self, tmp: Path, final: Path) -> None:
        """Give ``tmp`` the umask's file mode and rename it to ``final``."""
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, final)

    def __enter__(self) -> _Staging:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self._files:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _save_artifact(
    scripted: torch.jit.ScriptModule, path: Path, manifest: Manifest, mil_npz: bytes
) -> None:
    torch.jit.save(
        scripted,
        str(path),
        _extra_files={MANIFEST_NAME: manifest.to_json(), MIL_WEIGHTS_NAME: mil_npz},
    )


def _missed(what: str, fig: ParityFigures, strict: bool, consequence: str) -> None:
    """A reduced-precision gate was missed: ParityError when ``strict``, else a warning."""
    msg = (
        f"{what} missed its gate on {fig.n_samples} patches ({fig.data}): argmax agreement "
        f"{fig.argmax_agreement:.4f} (>= {VARIANT_MIN_AGREEMENT}), max |Δp| "
        f"{fig.max_abs_prob_diff:.4f} (<= {VARIANT_PROB_TOL})"
    )
    if strict:
        raise ParityError(msg)
    warnings.warn(f"{msg}; {consequence}", RuntimeWarning, stacklevel=4)


def _export_int8(
    model: HistoHelperModel,
    onnx_path: Path,
    staging: _Staging,
    calib: CalibrationSet,
    strict: bool,
) -> tuple[dict[str, object], Path | None]:
    """Quantise, gate under ONNX Runtime, then under every :data:`INT8_GATES` engine.

    Returns:
        ``(OnnxInfo updates, int8 file to publish or None)``.
    """
    int8_tmp = staging.tmp(".int8.onnx")
    ref_calib, _, _ = run_patches(model, calib.images)
    fig = quantize_onnx_int8(
        onnx_path, int8_tmp, staging.tmp(".pre.onnx"), calib=calib, ref_logits=ref_calib
    )
    gates: dict[str, ParityFigures] = {"onnxruntime": fig}
    if not fig.passed:
        _missed("onnx int8", fig, strict, "it is not written")
    else:
        for gate in INT8_GATES:
            passed_before = gate.after is None or (gate.after in gates and gates[gate.after].passed)
            result = gate.run(int8_tmp, calib, ref_calib) if passed_before else None
            if result is not None:
                gates[gate.engine] = result
    updates: dict[str, object] = {
        "int8_file_name": staging.out.with_suffix(".int8.onnx").name if fig.passed else None,
        "int8_calibration": f"{calib.source} (even-indexed patches)",
        "int8_gates": gates,
    }
    return updates, int8_tmp if fig.passed else None


def _export_onnx_files(
    model: HistoHelperModel,
    opts: ExportOptions,
    staging: _Staging,
    fixed: CalibrationSet,
    calib: CalibrationSet,
) -> tuple[OnnxInfo, dict[Path, Path]]:
    """The ONNX export (and int8 when asked), gated.

    Returns:
        ``(OnnxInfo, {temporary file: final path})`` of the files to publish.
    """
    out = staging.out
    onnx_tmp = staging.tmp(".onnx")
    info = export_onnx(
        model,
        onnx_tmp,
        patch_size_px=opts.patch_size_px,
        opset=opts.onnx_opset,
        check_images=fixed.images,
        data=fixed.source,
    )
    info = info.model_copy(update={"file_name": out.with_suffix(".onnx").name})
    files = {onnx_tmp: out.with_suffix(".onnx")}
    if opts.onnx_int8:
        updates, int8_tmp = _export_int8(model, onnx_tmp, staging, calib, opts.strict_variants)
        info = info.model_copy(update=updates)
        if int8_tmp is not None:
            files[int8_tmp] = out.with_suffix(".int8.onnx")
    return info, files


class _Steps:
    """Numbered progress messages (``"[2/6] calibration patches"``) for a caller."""

    def __init__(self, total: int, report: Callable[[str], None] | None) -> None:
        self.total, self.report, self.done = total, report, 0

    def __call__(self, text: str) -> None:
        self.done += 1
        if self.report is not None:
            self.report(f"[{self.done}/{self.total}] {text}")


def export_model(
    out_path: str | os.PathLike[str],
    options: ExportOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    **fields: Any,
) -> Manifest:
    """Export the model to ``out_path`` (TorchScript) and optionally ``.onnx`` beside it.

    Steps: :func:`build_model`; calibration patches; the TorchScript artifact with a
    provisional manifest; the fp32 and variant gates (:func:`_gates`); ONNX and int8
    with their gates (:func:`_export_onnx_files`); the artifact with the final
    manifest; then every file is renamed into place.

    Args:
        out_path: artifact path (``.pt``); the ONNX files are ``out_path`` with suffix
            ``.onnx`` and ``.int8.onnx``. Parent directories are created.
        options: what to export (default :class:`ExportOptions`).
        progress: called with one line as each stage starts (``"[3/6] fp32 parity
            gates: TorchScript vs eager"``); the CLI prints them on stderr.
        **fields: :class:`ExportOptions` fields overriding ``options``
            (``export_model(out, onnx=True, variants=())``).

    Returns:
        The manifest embedded in the artifact.

    Raises:
        WeightsError: a checkpoint is unreadable or does not fit (nothing written).
        ParityError: a gate failed (nothing written).
        InvalidOptionsError: inconsistent options or an unreadable calibration slide.
        TypeError: a keyword that is not an :class:`ExportOptions` field.
    """
    opts = dataclasses.replace(options or ExportOptions(), **fields)
    out = Path(out_path)
    step = _Steps(6 + opts.onnx, progress)
    step("building ResNet18 + MIL head" + (" and loading weights" if opts.weights else ""))
    built = build_model(opts)  # errors here happen before anything is written
    if built.untrained_parts:
        warnings.warn(
            f"exporting an UNTRAINED model: random weights (seed {opts.seed}) for "
            f"{' and '.join(built.untrained_parts)}; its outputs mean nothing and it must "
            "not be used for diagnosis",
            UntrainedModelWarning,
            stacklevel=2,
        )
    model = built.model
    step(f"calibration patches ({calib_source(opts)})")
    calib = _calibration(opts)
    fixed = synthetic_patches(opts.parity_batch, opts.patch_size_px, opts.seed + 1)
    base = _manifest_fields(opts, built, calib)
    with _Staging(out) as staging, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        step("TorchScript: scripting and saving")
        scripted = torch.jit.script(model)
        mil_npz = _mil_npz(model)
        fp32_only = (PrecisionVariant(precision="fp32", devices=VARIANT_DEVICES["fp32"]),)
        stage1 = staging.tmp(".pt")
        _save_artifact(scripted, stage1, Manifest(precisions=fp32_only, **base), mil_npz)  # type: ignore[arg-type]
        bag = fixed_bag(64, 512, opts.seed)
        step("fp32 parity gates: TorchScript (and the served module) vs eager")
        parity = _fp32_gates(model, stage1, fixed, bag, opts.check_served)
        step(f"precision variants gated against fp32: {', '.join(opts.variants) or 'none'}")
        precisions = _variant_gates(model, stage1, calib, opts.variants, opts.strict_variants)
        onnx_info: OnnxInfo | None = None
        files: dict[Path, Path] = {}
        if opts.onnx:
            int8 = ", int8 quantisation and its gates" if opts.onnx_int8 else ""
            step(f"ONNX export and its gate{int8}")
            onnx_info, files = _export_onnx_files(model, opts, staging, fixed, calib)
        manifest = Manifest(precisions=precisions, parity=parity, onnx=onnx_info, **base)  # type: ignore[arg-type]
        step("writing the artifact with its manifest")
        final = staging.tmp(".pt")
        _save_artifact(torch.jit.load(str(stage1)), final, manifest, mil_npz)
        if read_manifest(final) != manifest:  # pragma: no cover - defensive
            raise ParityError("manifest did not round-trip through the artifact")
        for tmp, dest in files.items():
            staging.publish(tmp, dest)
        staging.publish(final, out)
    log.info("exported %s (%s)", out.name, ", ".join(manifest.precision_names()))
    return manifest


def _fp32_gates(
    model: HistoHelperModel,
    artifact: Path,
    fixed: CalibrationSet,
    bag: torch.Tensor,
    check_served: bool,
) -> dict[str, ParityFigures]:
    """TorchScript (and the frozen module the runtime serves) vs eager fp32, patches
    and aggregation; returns the parity figures by ``<candidate>_<path>``.

    Raises:
        ParityError: a candidate differs by more than :data:`FP32_PROB_TOL`.
    """
    parity: dict[str, ParityFigures] = {}
    ref_logits, ref_emb, ref_cams = run_patches(model, fixed.images)
    with torch.inference_mode():
        ref_slide, ref_att = model.aggregate(bag)
    candidates = {"torchscript": torch.jit.load(str(artifact))}
    if check_served:
        candidates["served_fp32"] = prepare_for_serving(artifact, "fp32")
    exact = {"reference": "eager fp32", "tolerance": FP32_PROB_TOL, "min_agreement": 1.0}
    for name, mod in candidates.items():
        lg, emb, cams = run_patches(mod, fixed.images)
        fig = compare(lg, ref_logits, data=fixed.source, **exact)  # type: ignore[arg-type]
        with torch.inference_mode():
            s_lg, att = mod.aggregate(bag)
        afig = compare(s_lg, ref_slide, data=f"bag(n={len(bag)})", **exact)  # type: ignore[arg-type]
        parity[f"{name}_patches"], parity[f"{name}_aggregate"] = fig, afig
        att_diff = float((att - ref_att).abs().max())
        log.info(
            "%s parity: patches |Δp| %.3g, |Δlogit| %.3g, |Δemb| %.3g, |Δcam| %.3g; "
            "aggregate |Δp| %.3g, |Δatt| %.3g",
            name,
            fig.max_abs_prob_diff,
            fig.max_abs_logit_diff,
            float((emb - ref_emb).abs().max()),
            float((cams - ref_cams).abs().max()),
            afig.max_abs_prob_diff,
            att_diff,
        )
        if not (fig.passed and afig.passed and att_diff <= FP32_PROB_TOL):
            raise ParityError(
                f"{name} differs from eager fp32: patch max |Δp| {fig.max_abs_prob_diff:.3g}, "
                f"slide max |Δp| {afig.max_abs_prob_diff:.3g}, attention {att_diff:.3g} "
                f"(tolerance {FP32_PROB_TOL:g})"
            )
    return parity


def _variant_gates(
    model: HistoHelperModel,
    artifact: Path,
    calib: CalibrationSet,
    variants: Sequence[str],
    strict: bool,
) -> tuple[PrecisionVariant, ...]:
    """fp32 plus each reduced-precision variant, served as the runtime serves it and
    gated against eager fp32 on the calibration patches (failed ones recorded as such).

    Raises:
        ParityError: a variant missed its gate and ``strict``.
    """
    precisions = [PrecisionVariant(precision="fp32", devices=VARIANT_DEVICES["fp32"])]
    if not variants:
        return tuple(precisions)
    ref_calib, _, _ = run_patches(model, calib.images)
    for v in variants:
        dev = _check_variant_device(v)
        lg, _, _ = run_patches(
            prepare_for_serving(artifact, v, device=dev), calib.images, device=dev
        )
        fig = compare(
            lg,
            ref_calib,
            reference="eager fp32",
            tolerance=VARIANT_PROB_TOL,
            min_agreement=VARIANT_MIN_AGREEMENT,
            data=calib.source,
            checked_on=dev,
        )
        log.info("%s vs fp32: %s", v, fig)
        if not fig.passed:
            _missed(f"{v} variant", fig, strict, "it is recorded as failed and will not be served")
        precisions.append(PrecisionVariant(precision=v, devices=VARIANT_DEVICES[v], parity=fig))  # type: ignore[arg-type]
    return tuple(precisions)
