"""The full export: real-slide calibration, bf16 and fp16 variants, ONNX, ONNX Runtime backend."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from histohelper.model_export.calibration import slide_patches
from histohelper.model_export.export import UntrainedModelWarning, export_model
from histohelper.server.runtime import Manifest, ModelRuntime, load_runtime, read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_export(
    tmp_path_factory: pytest.TempPathFactory, real_slide: Path
) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("full") / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        m = export_model(
            out,
            variants=("bf16", "fp16"),
            calibration_slide=real_slide,
            calibration_patches=64,
            onnx=True,
        )
    return out, m


def test_calibration_patches_from_real_slide(real_slide: Path) -> None:
    cal = slide_patches(real_slide, size_px=224, target_mpp=0.5)
    assert cal.source.startswith("slide-sha256:") and "CMU" not in cal.source
    assert cal.images.dtype == np.uint8 and cal.images.shape[1:] == (224, 224, 3)
    assert 100 <= len(cal.images) <= 256  # 217 tissue cells of 450 on a half-step grid
    assert ((cal.images <= 220).any(axis=3).mean(axis=(1, 2)) >= 0.25).all()


def test_manifest_records_variants_and_calibration(full_export: tuple[Path, Manifest]) -> None:
    path, m = full_export
    assert read_manifest(path) == m
    assert m.calibration.startswith("slide-sha256:")
    variants = {v.precision: v for v in m.precisions}
    assert set(variants) == {"fp32", "bf16", "fp16"}
    for name in ("bf16", "fp16"):
        fig = variants[name].parity
        assert fig is not None and fig.passed, fig
        assert fig.n_samples == 64 and fig.data == m.calibration
        assert fig.argmax_agreement >= 0.99 and fig.max_abs_prob_diff <= 0.02


def test_onnx_file_checked_and_matches(full_export: tuple[Path, Manifest]) -> None:
    import onnx

    path, m = full_export
    assert m.onnx is not None and m.onnx.checker_passed and m.onnx.opset >= 17
    assert m.onnx.parity.max_abs_prob_diff <= 1e-4
    onnx_path = path.with_suffix(".onnx")
    assert onnx_path.is_file() and m.onnx.file_name == onnx_path.name
    onnx.checker.check_model(str(onnx_path))


@pytest.fixture(scope="module")
def runtimes(full_export: tuple[Path, Manifest]) -> tuple[ModelRuntime, ModelRuntime]:
    path, _ = full_export
    return load_runtime(path, backend="onnx"), load_runtime(path, device="cpu", precision="fp32")


@pytest.mark.parametrize("b", [1, 63, 64], ids=lambda b: f"batch{b}")
def test_onnx_runtime_matches_torchscript(
    runtimes: tuple[ModelRuntime, ModelRuntime], b: int
) -> None:
    ort_rt, ts_rt = runtimes
    assert (ort_rt.device, ort_rt.precision) == ("cpu", "fp32")
    x = np.random.default_rng(b).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
    a = ort_rt.predict_patches(x, want_cams=True)
    r = ts_rt.predict_patches(x, want_cams=True)
    assert np.abs(a.probabilities - r.probabilities).max() <= 1e-4
    assert np.abs(a.embeddings - r.embeddings).max() <= 1e-3
    assert a.cams is not None and r.cams is not None
    assert np.abs(a.cams - r.cams).max() <= 1e-3
    sa, sr = ort_rt.aggregate(a.embeddings), ts_rt.aggregate(a.embeddings)
    assert np.abs(sa.attention - sr.attention).max() <= 1e-6
    assert np.abs(sa.probabilities - sr.probabilities).max() <= 1e-5


def test_fp16_served_on_cpu_is_refused(full_export: tuple[Path, Manifest]) -> None:
    from histohelper.errors import ModelArtifactError

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelArtifactError):
        load_runtime(full_export[0], device="cpu", precision="fp16")


_ONNX_BOUNDARY = """
import json, sys
import numpy as np
from histohelper.server.runtime import load_runtime
rt = load_runtime(sys.argv[1], backend="onnx", num_threads=1)
out = rt.predict_patches(np.zeros((1, 224, 224, 3), np.uint8))
rt.aggregate(out.embeddings)
print(json.dumps(sorted(sys.modules)))
"""


def test_onnx_backend_needs_no_torch(full_export: tuple[Path, Manifest]) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _ONNX_BOUNDARY, str(full_export[0])],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = set(json.loads(res.stdout.strip().splitlines()[-1]))
    for forbidden in ("torch", "torchvision", "openslide", "cv2", "grpc"):
        assert forbidden not in loaded, forbidden
