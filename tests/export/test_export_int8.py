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
from histohelper.server.runtime.cpu import cpu_has_bf16, cpu_has_vnni
from histohelper.server.runtime.openvino import load_openvino

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
    assert m.onnx is not None and "onnxruntime" in m.onnx.int8_gates
    fig = m.onnx.int8_gates["onnxruntime"]
    assert fig.passed and fig.max_abs_prob_diff <= 0.02 and fig.argmax_agreement >= 0.99
    assert fig.data.startswith("slide-sha256:") and fig.n_samples == 64
    assert m.onnx.int8_passed() and m.onnx.int8_file_name == "model.int8.onnx"
    assert path.with_suffix(".int8.onnx").is_file()
    assert "even-indexed" in (m.onnx.int8_calibration or "")
    assert m.precision_names() == ("fp32",)  # int8 is an ONNX variant, not a TorchScript one
    ov = m.onnx.int8_gates.get("openvino")  # openvino is a server dependency: always gated here
    assert ov is not None and ov.passed and ov.max_abs_prob_diff <= 0.02
    assert ov.checked_on.startswith("cpu, openvino ") and ov.n_samples == 64
    assert m.onnx.int8_passed("openvino")
    bf16 = m.onnx.int8_gates.get("openvino-bf16")  # gated only where the CPU computes bf16
    if cpu_has_bf16():
        assert bf16 is not None and bf16.passed and bf16.max_abs_prob_diff <= 0.02
        assert bf16.checked_on.endswith("unquantised layers bf16") and bf16.n_samples == 64
        assert bf16.max_abs_logit_diff != ov.max_abs_logit_diff  # really another path
    else:
        assert bf16 is None and not m.onnx.int8_passed("openvino-bf16")


def _int8_label(engine: str) -> str:
    return "int8+bf16" if engine == "openvino" and cpu_has_bf16() else "int8"


def _with_onnx_info(path: Path, dest: Path, **updates: object) -> Path:
    """A copy of the export in ``dest`` whose manifest's onnx info has ``updates``."""
    import shutil
    import zipfile

    from histohelper.server.runtime import MANIFEST_NAME, read_manifest

    m = read_manifest(path)
    assert m.onnx is not None
    for f in path.parent.iterdir():
        shutil.copy(f, dest / f.name)
    copy = dest / path.name
    changed = m.model_copy(update={"onnx": m.onnx.model_copy(update=updates)})
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(copy, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/extra/" + MANIFEST_NAME):
                data = changed.to_json().encode()
            dst.writestr(info, data)
    return copy


@pytest.mark.parametrize(("backend", "engine"), [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_int8_served_close_to_fp32_and_cams_exact(
    int8_export: tuple[Path, Manifest], real_slide: Path, backend: str, engine: str
) -> None:
    path, _ = int8_export
    q = load_runtime(path, backend=backend, precision="int8", num_threads=2)  # type: ignore[arg-type]
    ref = load_runtime(path, device="cpu", precision="fp32")
    fp = load_runtime(path, backend=backend, precision="fp32")  # type: ignore[arg-type]
    assert (q.device, q.precision, q.engine) == ("cpu", _int8_label(engine), engine)
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
    """One infer request per stream, calls from several threads at once: results match
    a serial run, patch by patch."""
    from concurrent.futures import ThreadPoolExecutor

    path, _ = int8_export
    rt = load_runtime(path, backend="openvino", precision="int8", num_threads=2)
    # 2 threads: OpenVINO picks 2 streams of one thread here (1 on some CPUs)
    assert rt.concurrency in (1, 2)
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8) for n in (1, 5, 8, 3)]
    serial = [rt.predict_patches(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(rt.predict_patches, batches * 2))
    for got, want in zip(threaded, serial * 2, strict=True):
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-6)
        np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-6)
    one_by_one = [rt.predict_patches(batches[1][i : i + 1]) for i in range(5)]
    np.testing.assert_allclose(
        np.concatenate([o.logits for o in one_by_one]), serial[1].logits, atol=1e-4
    )


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
    assert rt.precision == (_int8_label("openvino") if expected == "openvino" else "fp32")
    assert load_runtime(path, device="cpu", precision="fp32", backend="auto").precision == "fp32"


def test_auto_backend_falls_back_to_onnxruntime_without_an_openvino_gate(
    int8_export: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """An artifact exported where OpenVINO was missing has no OpenVINO int8 gate: auto
    serves it with ONNX Runtime, and an explicit openvino int8 is refused."""
    path, m = int8_export
    assert m.onnx is not None
    copy = _with_onnx_info(
        path, tmp_path, int8_gates={"onnxruntime": m.onnx.int8_gates["onnxruntime"]}
    )
    if cpu_has_vnni():
        assert choose_backend(copy, "cpu", "auto") == "onnx"
    with pytest.raises(ModelArtifactError, match="openvino"):
        load_runtime(copy, backend="openvino", precision="int8")
    assert load_runtime(copy, backend="openvino", precision="auto").precision == "fp32"


def test_openvino_int8_keeps_f32_rest_without_its_bf16_gate(
    int8_export: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """bf16 for the unquantised layers is served only where the export gated it."""
    path, m = int8_export
    assert m.onnx is not None and "openvino" in m.onnx.int8_gates
    failed = m.onnx.int8_gates["openvino"].model_copy(update={"passed": False})
    for i, fig in enumerate((None, failed)):
        (tmp_path / str(i)).mkdir()
        gates = {k: v for k, v in m.onnx.int8_gates.items() if k != "openvino-bf16"}
        if fig is not None:
            gates["openvino-bf16"] = fig
        copy = _with_onnx_info(path, tmp_path / str(i), int8_gates=gates)
        rt = load_runtime(copy, backend="openvino", precision="int8", num_threads=2)
        assert (rt.precision, rt.engine) == ("int8", "openvino")
        with pytest.raises(ModelArtifactError, match="bf16"):
            load_openvino(copy, precision="int8", rest_precision="bf16")
    assert load_openvino(path, precision="int8", rest_precision="f32").precision == "int8"
    if cpu_has_bf16():
        assert load_runtime(path, backend="openvino", precision="int8").precision == "int8+bf16"
        assert load_openvino(path, precision="int8", rest_precision="bf16").precision == (
            "int8+bf16"
        )


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


def test_classify_patches_over_grpc_with_openvino_streams(
    int8_export: tuple[Path, Manifest], slides_dir: Path
) -> None:
    """ClassifyPatches spreads a request over the worker's threads (one per OpenVINO
    stream) and maps every result back to its image, bad images included."""
    import grpc

    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig
    from histohelper.v1 import slide_analysis_pb2 as pb
    from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

    path, _ = int8_export
    rt = load_runtime(path, backend="openvino", precision="int8", num_threads=2)
    config = ServerConfig(model_path=path, slide_root=slides_dir, port=0, batch_size=16)
    running = start_server(config, runtime=rt)
    try:
        images = np.random.default_rng(9).integers(0, 256, (37, 224, 224, 3), dtype=np.uint8)
        items = [
            pb.PatchImage(
                id=f"p{i}", raw=pb.RawImage(width_px=224, height_px=224, rgb=im.tobytes())
            )
            for i, im in enumerate(images)
        ]
        items.insert(5, pb.PatchImage(id="junk", encoded=b"not an image"))
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.SlideAnalysisServiceStub(channel)
            (reply,) = list(stub.ClassifyPatches(iter([pb.ClassifyPatchesRequest(images=items)])))
        preds = {p.id: p for p in reply.predictions}
        assert preds["junk"].error and len(preds) == 38
        got = np.array([preds[f"p{i}"].probabilities for i in range(37)], np.float32)
        want = np.concatenate(
            [rt.predict_patches(images[i : i + 1]).probabilities for i in range(37)]
        )
        np.testing.assert_allclose(got, want, atol=1e-4)
    finally:
        running.stop(grace=0)


def test_auto_backend_on_a_cpu_only_machine_never_imports_torch(
    int8_export: tuple[Path, Manifest],
) -> None:
    """Where no GPU device node exists, serving the int8 model with ``device="auto"``
    leaves torch (and its ~450 MiB of CUDA libraries) unloaded."""
    import subprocess
    import sys

    from histohelper.server.runtime import accelerator_possible

    if accelerator_possible():
        pytest.skip("this machine could have a GPU: torch is asked, as it should be")
    if not cpu_has_vnni():
        pytest.skip("without VNNI the CPU is served by TorchScript, which is torch")
    path, _ = int8_export
    code = (
        "import sys\n"
        "from histohelper.server.runtime import load_runtime\n"
        f"rt = load_runtime({str(path)!r}, device='auto', backend='auto')\n"
        "print(rt.precision, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    precision, torch_loaded = out.stdout.split()
    assert torch_loaded == "False", out.stdout
    assert precision.startswith("int8")
