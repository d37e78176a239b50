"""The serving runtime over the session's exported artifact."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from histohelper.errors import (
    EmptyBagError,
    InvalidImageError,
    InvalidOptionsError,
    ModelArtifactError,
)
from histohelper.server.runtime import (
    Manifest,
    ModelRuntime,
    PatchOutput,
    SlideOutput,
    load_runtime,
    read_manifest,
)
from histohelper.server.runtime.cpu import cpu_has_native_bf16


@pytest.fixture(scope="module")
def runtime(model_artifact: Path) -> ModelRuntime:
    return load_runtime(model_artifact, device="cpu", precision="fp32")


def _images(b: int, seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3), dtype=np.uint8)


def test_runtime_satisfies_protocol(runtime: ModelRuntime) -> None:
    assert isinstance(runtime, ModelRuntime)
    assert isinstance(runtime.manifest, Manifest)
    assert (runtime.device, runtime.precision) == ("cpu", "fp32")


def test_predict_patches_outputs(runtime: ModelRuntime) -> None:
    out = runtime.predict_patches(_images(3))
    assert isinstance(out, PatchOutput) and out.cams is None
    assert out.logits.shape == (3, 2) and out.logits.dtype == np.float32
    assert out.embeddings.shape == (3, 512) and out.embeddings.dtype == np.float32
    assert out.probabilities.dtype == np.float32
    np.testing.assert_allclose(out.probabilities.sum(1), 1, atol=1e-6)
    with_cams = runtime.predict_patches(_images(3), want_cams=True)
    assert with_cams.cams is not None and with_cams.cams.shape == (3, 2, 7, 7)
    assert with_cams.cams.dtype == np.float32
    np.testing.assert_allclose(with_cams.logits, out.logits, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 224, 224, 3), np.float32),
        np.zeros((224, 224, 3), np.uint8),
        np.zeros((2, 3, 224, 224), np.uint8),
        np.zeros((2, 256, 256, 3), np.uint8),
        np.zeros((0, 224, 224, 3), np.uint8),
        [[1, 2, 3]],
    ],
    ids=["float32", "no-batch", "nchw", "wrong-size", "empty", "list"],
)
def test_bad_images_raise(runtime: ModelRuntime, bad: object) -> None:
    with pytest.raises(InvalidImageError):
        runtime.predict_patches(bad)  # type: ignore[arg-type]


def test_aggregate_outputs_and_large_bag(runtime: ModelRuntime) -> None:
    bag = np.abs(np.random.default_rng(1).standard_normal((50_000, 512), dtype=np.float32))
    out = runtime.aggregate(bag)
    assert isinstance(out, SlideOutput)
    assert out.logits.shape == (2,) and out.probabilities.shape == (2,)
    assert out.attention.shape == (50_000,) and out.attention.dtype == np.float32
    assert (out.attention >= 0).all()
    assert abs(float(out.attention.astype(np.float64).sum()) - 1) < 1e-4
    perm = np.random.default_rng(2).permutation(50_000)
    out_p = runtime.aggregate(bag[perm])
    np.testing.assert_allclose(out_p.probabilities, out.probabilities, atol=1e-5)
    np.testing.assert_allclose(out_p.attention, out.attention[perm], rtol=1e-4, atol=1e-9)


def test_aggregate_bag_of_one(runtime: ModelRuntime) -> None:
    out = runtime.aggregate(np.ones((1, 512), np.float32))
    assert out.attention.tolist() == [1.0]


def test_empty_bag_raises(runtime: ModelRuntime) -> None:
    with pytest.raises(EmptyBagError, match="empty bag"):
        runtime.aggregate(np.zeros((0, 512), np.float32))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((3, 256), np.float32),
        np.zeros(512, np.float32),
        np.full((2, 512), np.nan, np.float32),
    ],
    ids=["wrong-dim", "1d", "nan"],
)
def test_bad_bag_raises(runtime: ModelRuntime, bad: np.ndarray) -> None:
    with pytest.raises(InvalidOptionsError):
        runtime.aggregate(bad)


def test_patch_then_aggregate_pipeline(runtime: ModelRuntime) -> None:
    emb = runtime.predict_patches(_images(5, 3)).embeddings
    out = runtime.aggregate(emb)
    np.testing.assert_allclose(out.probabilities.sum(), 1, atol=1e-6)


def test_auto_precision_on_this_cpu(model_artifact: Path, runtime: ModelRuntime) -> None:
    rt = load_runtime(model_artifact, device="auto" if not _has_accel() else "cpu")
    assert rt.device == "cpu"
    assert rt.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    x = _images(8, 4)
    p = rt.predict_patches(x).probabilities
    ref = runtime.predict_patches(x).probabilities
    assert np.abs(p - ref).max() <= 0.02
    assert p.dtype == np.float32


def _has_accel() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "cpu", "precision": "fp16"}, "not supported on device cpu"),
        ({"device": "cpu", "precision": "int8"}, "unknown"),
        ({"device": "tpu"}, "unknown or not available"),
    ],
    ids=["fp16-on-cpu", "int8", "tpu"],
)
def test_unsupported_device_or_precision(model_artifact: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ModelArtifactError, match=match):
        load_runtime(model_artifact, **kwargs)


def test_cuda_missing_is_artifact_error(model_artifact: Path) -> None:
    if _has_accel():
        pytest.skip("an accelerator is present")
    with pytest.raises(ModelArtifactError, match="CUDA is not available"):
        load_runtime(model_artifact, device="cuda")


def test_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ModelArtifactError, match="not found"):
        read_manifest(tmp_path / "nope.pt")
    with pytest.raises(ModelArtifactError, match="not found"):
        load_runtime(tmp_path / "nope.pt")


def test_not_an_archive(tmp_path: Path) -> None:
    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a zip at all")
    with pytest.raises(ModelArtifactError, match="not a TorchScript archive"):
        read_manifest(p)


def _with_manifest(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "fake.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("fake/extra/manifest.json", text)
        zf.writestr("fake/data.pkl", b"")
    return p


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"format_version": 99}', "format_version 99 is not supported"),
        ('{"format_version": 1, "model_name": "x"}', "manifest is invalid"),
    ],
    ids=["bad-json", "array", "version", "fields"],
)
def test_invalid_manifest(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ModelArtifactError, match=match):
        read_manifest(_with_manifest(tmp_path, text))


def test_manifest_tampered_artifact_fails_to_load(tmp_path: Path, model_artifact: Path) -> None:
    """A valid manifest in an archive that is not a TorchScript module."""
    text = read_manifest(model_artifact).to_json()
    with pytest.raises(ModelArtifactError, match="cannot be loaded"):
        load_runtime(_with_manifest(tmp_path, text), device="cpu")


_BOUNDARY = """
import json, sys
import numpy as np
from histohelper.server.runtime import load_runtime, read_manifest
m = read_manifest(sys.argv[1])
after_manifest = sorted(sys.modules)
rt = load_runtime(sys.argv[1], device="cpu", num_threads=1)
x = np.zeros((2, 224, 224, 3), np.uint8)
out = rt.predict_patches(x, want_cams=True)
rt.aggregate(out.embeddings)
import torch
print(json.dumps({"modules": sorted(sys.modules), "after_manifest": after_manifest,
                  "threads": torch.get_num_threads()}))
"""


def test_serving_imports_no_torchvision_openslide_cv2_grpc(model_artifact: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _BOUNDARY, str(model_artifact)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(res.stdout.strip().splitlines()[-1])
    loaded = set(report["modules"])
    for forbidden in ("torchvision", "openslide", "cv2", "grpc", "histohelper.model_export"):
        assert forbidden not in loaded, forbidden
    assert "torch" not in report["after_manifest"], "read_manifest must not import torch"
    assert report["threads"] == 1


@pytest.mark.gpu
def test_cuda_reduced_precision_matches_cpu_fp32(
    model_artifact: Path, runtime: ModelRuntime
) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    x = _images(16, 7)
    ref = runtime.predict_patches(x, want_cams=True)
    for precision in ("fp32", "fp16", "bf16"):
        if precision not in read_manifest(model_artifact).precision_names():
            continue
        rt = load_runtime(model_artifact, device="cuda", precision=precision)
        assert rt.device == "cuda:0"
        out = rt.predict_patches(x, want_cams=True)
        tol = 1e-4 if precision == "fp32" else 0.02
        assert np.abs(out.probabilities - ref.probabilities).max() <= tol, precision
        bag = rt.aggregate(out.embeddings)
        assert abs(float(bag.attention.sum()) - 1) < 1e-5
