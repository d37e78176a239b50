"""The int8 ONNX variant: static QDQ quantisation, its parity gate, and how it is served."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from histohelper.errors import ModelArtifactError
from histohelper.model_export.calibration import slide_patches
from histohelper.model_export.export import UntrainedModelWarning, export_model
from histohelper.server.runtime import (
    Manifest,
    choose_backend,
    load_runtime,
)
from histohelper.server.runtime.onnx import cpu_has_vnni

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_export(
    tmp_path_factory: pytest.TempPathFactory, real_slide: Path
) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("int8") / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        m = export_model(
            out,
            variants=(),
            calibration_slide=real_slide,
            calibration_patches=64,
            onnx=True,
            onnx_int8=True,
        )
    return out, m


def test_int8_gate_recorded_and_file_written(int8_export: tuple[Path, Manifest]) -> None:
    path, m = int8_export
    assert m.onnx is not None and m.onnx.int8_parity is not None
    fig = m.onnx.int8_parity
    assert fig.passed and fig.max_abs_prob_diff <= 0.02 and fig.argmax_agreement >= 0.99
    assert fig.data.startswith("slide-sha256:") and fig.n_samples == 64
    assert m.onnx.int8_passed() and m.onnx.int8_file_name == "model.int8.onnx"
    assert path.with_suffix(".int8.onnx").is_file()
    assert "even-indexed" in (m.onnx.int8_calibration or "")
    assert m.precision_names() == ("fp32",)  # int8 is an ONNX variant, not a TorchScript one
    ov = m.onnx.int8_parity_openvino  # openvino is a server dependency: always gated here
    assert ov is not None and ov.passed and ov.max_abs_prob_diff <= 0.02
    assert ov.checked_on.startswith("cpu, openvino ") and ov.n_samples == 64
    assert m.onnx.int8_passed("openvino")


@pytest.mark.parametrize(("backend", "engine"), [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_int8_served_close_to_fp32_and_cams_exact(
    int8_export: tuple[Path, Manifest], real_slide: Path, backend: str, engine: str
) -> None:
    path, _ = int8_export
    q = load_runtime(path, backend=backend, precision="int8", num_threads=2)  # type: ignore[arg-type]
    ref = load_runtime(path, device="cpu", precision="fp32")
    fp = load_runtime(path, backend=backend, precision="fp32")  # type: ignore[arg-type]
    assert (q.device, q.precision, q.engine) == ("cpu", "int8", engine)
    assert (fp.precision, ref.engine) == ("fp32", "torchscript")
    x = slide_patches(real_slide, size_px=224, target_mpp=0.5, max_patches=24).images
    a, r = q.predict_patches(x), ref.predict_patches(x)
    assert a.cams is None
    assert np.abs(a.probabilities - r.probabilities).max() <= 0.02
    assert (a.probabilities.argmax(1) == r.probabilities.argmax(1)).mean() >= 0.99
    with_cams = q.predict_patches(x[:3], want_cams=True)
    exact = fp.predict_patches(x[:3], want_cams=True)
    assert with_cams.cams is not None and exact.cams is not None
    np.testing.assert_allclose(with_cams.cams, exact.cams, atol=1e-5)
    bag = q.aggregate(a.embeddings)
    assert abs(float(bag.attention.sum()) - 1) < 1e-5
    # fp32 through the ONNX engine is fp32, not a silent bf16 (OpenVINO's CPU default)
    np.testing.assert_allclose(fp.predict_patches(x).probabilities, r.probabilities, atol=1e-5)


def test_openvino_runtime_is_thread_safe(int8_export: tuple[Path, Manifest]) -> None:
    """Each thread gets its own infer request; results match a serial run."""
    from concurrent.futures import ThreadPoolExecutor

    path, _ = int8_export
    rt = load_runtime(path, backend="openvino", precision="int8", num_threads=2)
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8) for n in (1, 5, 8, 3)]
    serial = [rt.predict_patches(b).logits for b in batches]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda b: rt.predict_patches(b).logits, batches * 2))
    for got, want in zip(threaded, serial * 2, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_auto_backend_picks_int8_only_where_it_applies(
    int8_export: tuple[Path, Manifest], model_artifact: Path
) -> None:
    path, _ = int8_export
    expected = "openvino" if cpu_has_vnni() else "torchscript"
    assert choose_backend(path, "cpu", "auto") == expected
    assert choose_backend(path, "cpu", "fp32") == "torchscript"
    assert choose_backend(path, "cpu", "bf16") == "torchscript"
    assert choose_backend(path, "cuda", "auto") == "torchscript"
    assert choose_backend(model_artifact, "cpu", "auto") == "torchscript"  # no ONNX
    rt = load_runtime(path, device="cpu", backend="auto")
    assert rt.precision == ("int8" if expected == "openvino" else "fp32")
    assert load_runtime(path, device="cpu", precision="fp32", backend="auto").precision == "fp32"


def test_auto_backend_falls_back_to_onnxruntime_without_an_openvino_gate(
    int8_export: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """An artifact exported where OpenVINO was missing has no OpenVINO int8 gate: auto
    serves it with ONNX Runtime, and an explicit openvino int8 is refused."""
    import shutil
    import zipfile

    from histohelper.server.runtime import MANIFEST_NAME

    path, m = int8_export
    assert m.onnx is not None
    copy = tmp_path / "model.pt"
    for f in path.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    stripped = m.model_copy(
        update={"onnx": m.onnx.model_copy(update={"int8_parity_openvino": None})}
    )
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(copy, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/extra/" + MANIFEST_NAME):
                data = stripped.to_json().encode()
            dst.writestr(info, data)
    if cpu_has_vnni():
        assert choose_backend(copy, "cpu", "auto") == "onnx"
    with pytest.raises(ModelArtifactError, match="openvino"):
        load_runtime(copy, backend="openvino", precision="int8")
    assert load_runtime(copy, backend="openvino", precision="auto").precision == "fp32"


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_int8_refused_where_not_offered(model_artifact: Path, backend: str) -> None:
    with pytest.raises(ModelArtifactError):
        load_runtime(model_artifact, backend=backend, precision="int8")  # type: ignore[arg-type]
    with pytest.raises(ModelArtifactError):
        load_runtime(model_artifact, backend="torchscript", precision="int8")


def test_export_int8_needs_onnx(tmp_path: Path) -> None:
    from histohelper.errors import InvalidOptionsError

    with pytest.raises(InvalidOptionsError):
        export_model(tmp_path / "m.pt", onnx=False, onnx_int8=True)
    assert not list(tmp_path.iterdir())
