"""TorchScript implementation of :class:`~.types.ModelRuntime`.

Loads the artifact with ``torch.jit.load`` only: no model classes, no torchvision. At
load time the patch network is cast to the chosen precision, put in channels-last
memory format, and the module is frozen (``torch.jit.freeze``: conv + batch-norm
folding, parameters inlined as constants) for the chosen device; then a warm-up batch
runs. All inference runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from histohelper.errors import (
    EmptyBagError,
    InvalidImageError,
    InvalidOptionsError,
    ModelArtifactError,
)

from .cpu import cpu_has_native_bf16
from .manifest import Manifest, read_manifest
from .types import (
    MC_DROPOUT_SEED,
    McDropoutOutput,
    PatchOutput,
    SlideOutput,
    check_bag,
    check_images,
    check_mc_request,
    run_mc_chunks,
    softmax,
)

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRESERVED = ["predict_patches_uint8", "predict_patches_nchw", "aggregate"]
#: Exported by artifacts that carry MIL dropout (Monte-Carlo dropout); older lack it.
_OPTIONAL = ["aggregate_mc"]


def resolve_device(device: str) -> str:
    """Resolve ``"auto"`` (cuda -> mps -> cpu) and normalise names.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Returns:
        ``"cpu"``, ``"cuda:N"`` or ``"mps"``.

    Raises:
        ModelArtifactError: the device is unknown or not available here.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cpu" or (device == "mps" and torch.backends.mps.is_available()):
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelArtifactError("device 'cuda' requested but CUDA is not available")
        idx = int(device.split(":", 1)[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ModelArtifactError(f"device {device!r} does not exist")
        return f"cuda:{idx}"
    raise ModelArtifactError(f"device {device!r} is unknown or not available")


def device_precisions(device: str) -> tuple[str, ...]:
    """Precisions the device can run fast, in order of preference (fastest first).

    bf16 comes first where oneDNN has a native bf16 path, and channels-last is
    always used (see benchmarks/RESULTS.md). fp16 on CPU has no fast path
    without AVX512-FP16/AMX-FP16 and is not offered. On CUDA fp16 and bf16 run on
    tensor cores alike; fp16 keeps more mantissa, so it is preferred.

    Args:
        device: a resolved device (``"cpu"``, ``"cuda:N"``, ``"mps"``).

    Returns:
        Supported precisions, preferred first; always ends with ``"fp32"``.
    """
    if device == "cpu":
        return ("bf16", "fp32") if cpu_has_native_bf16() else ("fp32",)
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return ("fp16", "bf16", "fp32")
        return ("fp16", "fp32")
    if device == "mps":
        return ("fp16", "fp32")
    return ("fp32",)


def choose_precision(manifest: Manifest, device: str, precision: str) -> str:
    """Pick the precision to serve.

    Args:
        manifest: the artifact's manifest (which variants passed their gate).
        device: a resolved device.
        precision: ``"auto"`` or an explicit ``"fp32"``/``"bf16"``/``"fp16"``.

    Returns:
        For ``"auto"``, the first of :func:`device_precisions` whose variant is in the
        artifact and passed its parity gate; else the explicit precision.

    Raises:
        ModelArtifactError: an explicit precision that the device cannot run fast, or
            that the artifact does not offer (absent or failed its gate).
    """
    supported = device_precisions(device)
    offered = manifest.precision_names()
    if precision == "auto":
        for p in supported:
            if p in offered:
                return p
        return "fp32"
    if precision not in _DTYPES:
        raise ModelArtifactError(f"precision {precision!r} is unknown (fp32, bf16, fp16)")
    if precision not in supported:
        raise ModelArtifactError(
            f"precision {precision} is not supported on device {device} "
            f"(supported here: {', '.join(supported)})"
        )
    if precision not in offered:
        raise ModelArtifactError(
            f"the model artifact offers no {precision} variant that passed its parity gate "
            f"(offers: {', '.join(offered)})"
        )
    return precision


class TorchScriptRuntime:
    """A frozen TorchScript artifact on one device, in one precision.

    Build with :func:`load_torchscript` (or :func:`~histohelper.server.runtime.load_runtime`).
    Calls may come from several threads; each call is independent, but the server
    should keep one owner of the device for throughput.

    Attributes:
        manifest: the artifact's manifest.
        device: ``"cpu"``, ``"cuda:0"``, ``"mps"``.
        precision: precision of the patch path (MIL aggregation is always fp32).
        engine: ``"torchscript"``.
        concurrency: 1 (each call uses every intra-op thread).
        channels_last: whether the patch network runs in channels-last memory format.
        load_seconds: wall time of loading, freezing and warm-up, seconds.
    """

    def __init__(
        self,
        module: torch.jit.ScriptModule,
        manifest: Manifest,
        device: str,
        precision: str,
        channels_last: bool,
        load_seconds: float,
    ) -> None:
        self._module = module
        self.manifest = manifest
        self.device = device
        self.precision = precision
        self.engine = "torchscript"
        self.concurrency = 1
        self.channels_last = channels_last
        self.load_seconds = load_seconds
        self._torch_device = torch.device(device)

    def predict_patches(
        self, images: npt.NDArray[np.uint8], *, want_cams: bool = False
    ) -> PatchOutput:
        """See :meth:`ModelRuntime.predict_patches`.

        Args:
            images: uint8 ``[B, H, W, 3]`` RGB at ``manifest.patch_size_px``.
            want_cams: also return CAMs ``[B, C, h, w]``.

        Returns:
            :class:`PatchOutput` (float32 numpy arrays on the host).

        Raises:
            InvalidImageError: wrong shape or dtype.
        """
        arr = check_images(images, self.manifest.patch_size_px)
        x = torch.from_numpy(arr)
        with torch.inference_mode():
            if self._torch_device.type != "cpu":
                x = x.to(self._torch_device, non_blocking=True)
            logits, emb, cams = self._module.predict_patches_uint8(x, want_cams)
            logits_np = logits.cpu().numpy()
            emb_np = emb.cpu().numpy()
            cams_np = cams.cpu().numpy() if cams is not None else None
        return PatchOutput(
            logits=logits_np,
            probabilities=softmax(logits_np, axis=1),
            embeddings=emb_np,
            cams=cams_np,
        )

    def aggregate(self, embeddings: npt.NDArray[np.float32]) -> SlideOutput:
        """See :meth:`ModelRuntime.aggregate`.

        Args:
            embeddings: float32 ``[N, D]``, N >= 1.

        Returns:
            :class:`SlideOutput`.

        Raises:
            EmptyBagError: N == 0.
            InvalidOptionsError: wrong shape or non-finite values.
        """
        bag = check_bag(embeddings, self.manifest.embedding_dim)
        with torch.inference_mode():
            h = torch.from_numpy(bag).to(self._torch_device)
            try:
                logits, attention = self._module.aggregate(h)
            except RuntimeError as exc:  # pragma: no cover - guarded by check_bag
                if "EmptyBag" in str(exc):
                    raise EmptyBagError("cannot aggregate an empty bag") from None
                raise
            logits_np = logits.cpu().numpy()
            att_np = attention.cpu().numpy()
        return SlideOutput(
            logits=logits_np, probabilities=softmax(logits_np, axis=0), attention=att_np
        )

    def aggregate_mc(
        self,
        embeddings: npt.NDArray[np.float32],
        passes: int,
        seed: int = MC_DROPOUT_SEED,
        *,
        stop: threading.Event | None = None,
    ) -> McDropoutOutput:
        """See :meth:`ModelRuntime.aggregate_mc`: the artifact's ``aggregate_mc``
        (``torch.Generator`` on the serving device, seeded per call).

        Raises:
            EmptyBagError: N == 0.
            InvalidOptionsError: wrong shape, non-finite values, passes out of range, or
                a model with no dropout (also an artifact exported before
                ``aggregate_mc`` existed).
        """
        check_mc_request(self.manifest, passes)
        if not hasattr(self._module, "aggregate_mc"):
            raise InvalidOptionsError("the model has no dropout (no aggregate_mc method)")
        bag = check_bag(embeddings, self.manifest.embedding_dim)
        with torch.inference_mode():
            h = torch.from_numpy(bag).to(self._torch_device)

            def run(n: int, s: int) -> npt.NDArray[np.float32]:
                return self._module.aggregate_mc(h, n, s).cpu().numpy()

            return run_mc_chunks(run, int(passes), int(seed), stop)


def load_torchscript(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    precision: str = "auto",
    num_threads: int | None = None,
    channels_last: bool = True,
    freeze: bool = True,
    warmup: bool = True,
) -> TorchScriptRuntime:
    """Load a TorchScript artifact for serving.

    Args:
        path: the ``.pt`` artifact.
        device: ``"auto"`` (cuda -> mps -> cpu), ``"cpu"``, ``"cuda[:N]"``, ``"mps"``.
        precision: ``"auto"`` (see :func:`choose_precision`) or fp32/bf16/fp16.
        num_threads: intra-op CPU threads (``torch.set_num_threads``, process-wide);
            None leaves torch's default (one per physical core).
        channels_last: run the patch network channels-last (faster with oneDNN and
            cuDNN; see benchmarks/RESULTS.md).
        freeze: ``torch.jit.freeze`` after casting (folds batch norm into convs).
        warmup: run one batch of 2 patches and a bag of 2 (also through
            ``aggregate_mc`` when the head has dropout) after loading, so the first
            request does not pay the TorchScript profiling runs.

    Returns:
        A ready :class:`TorchScriptRuntime`.

    Raises:
        ModelArtifactError: missing/invalid artifact or manifest, unknown or
            unavailable device, or a precision the device or artifact does not offer.
    """
    t0 = time.perf_counter()
    p = Path(path)
    manifest = read_manifest(p)
    dev = resolve_device(device)
    prec = choose_precision(manifest, dev, precision)
    if num_threads is not None:
        if num_threads < 1:
            raise ModelArtifactError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it is still what we serve.
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            module = torch.jit.load(str(p), map_location=dev)
        except Exception as exc:  # torch raises RuntimeError/ValueError of many kinds
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelArtifactError(f"model artifact cannot be loaded: {first}") from None
        for name in _PRESERVED:
            if not hasattr(module, name):
                raise ModelArtifactError(f"model artifact lacks the exported method {name!r}")
        module.eval()
        if prec != "fp32":
            module.patch.to(_DTYPES[prec])
        if channels_last:
            module.patch.to(memory_format=torch.channels_last)
        if freeze:
            keep = _PRESERVED + [n for n in _OPTIONAL if hasattr(module, n)]
            module = torch.jit.freeze(module, preserved_attrs=keep)
    rt = TorchScriptRuntime(module, manifest, dev, prec, channels_last, 0.0)
    if warmup:
        s = manifest.patch_size_px
        rng = np.random.default_rng(0)
        imgs = rng.integers(0, 256, size=(2, s, s, 3), dtype=np.uint8)
        for _ in range(2):  # the profiling executor specialises on the second run
            rt.predict_patches(imgs, want_cams=True)
            rt.predict_patches(imgs)
        bag = rng.standard_normal((2, manifest.embedding_dim)).astype(np.float32)
        rt.aggregate(bag)
        if manifest.mil_dropout > 0 and hasattr(module, "aggregate_mc"):
            for _ in range(2):  # as above: the first MC request skips the profiling runs
                rt.aggregate_mc(bag, 2, 0)
    rt.load_seconds = time.perf_counter() - t0
    log.info(
        "loaded model %s %s on %s (%s, channels_last=%s) in %.2f s",
        manifest.model_name,
        manifest.model_version,
        dev,
        prec,
        channels_last,
        rt.load_seconds,
    )
    return rt


__all__ = [
    "InvalidImageError",
    "TorchScriptRuntime",
    "choose_precision",
    "device_precisions",
    "load_torchscript",
    "resolve_device",
]
