"""Shared fixtures: where the shared test slides are, and one exported model artifact.

Real slides are read from ``../shared/slides/`` (never copied into the repository).
Synthetic slides are generated per session by ``synthetic_slides`` (tifffile).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ("server_fixtures", "orthanc_support")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("HISTOHELPER_SHARED", REPO_ROOT.parent / "shared")).resolve()
SLIDES_DIR = SHARED_DIR / "slides"
REAL_SLIDE = SLIDES_DIR / "real" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """``../shared/slides``; the suite fails loudly when it is missing (CI lays it)."""
    assert SLIDES_DIR.is_dir(), f"shared slides missing: {SLIDES_DIR}"
    return SLIDES_DIR


@pytest.fixture(scope="session")
def real_slide(slides_dir: Path) -> Path:
    """The real Aperio SVS (CMU-1-Small-Region, 2220 x 2967 px, 0.499 um/px)."""
    return slides_dir / "real" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def model_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exported model artifact per session: the default seeded UNTRAINED model.

    ResNet18 + gated attention MIL, classes ``benign``/``malignant`` (patch and slide),
    224 px at 0.5 mpp, seed 0, fp32 plus a bf16 variant checked on 16 synthetic
    patches (so ``load_runtime(precision="auto")`` serves bf16 on CPUs with
    AVX512-BF16/AMX), no ONNX. Takes ~3 s on 2 cores. The full export (ONNX, slide
    calibration, fp16) is tested in ``tests/export``.
    """
    import warnings

    from histohelper.model_export.export import UntrainedModelWarning, export_model

    out = tmp_path_factory.mktemp("model") / "histohelper-untrained.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        export_model(out, seed=0, variants=("bf16",), calibration_patches=16, onnx=False)
    return out


@pytest.fixture(scope="session")
def model_artifact_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second seeded UNTRAINED artifact (seed 1, fp32 only): same architecture and
    classes as ``model_artifact``, different weights, so its results differ (model
    repository tests: two versions, two models). ~3 s on 2 cores."""
    import warnings

    from histohelper.model_export.export import UntrainedModelWarning, export_model

    out = tmp_path_factory.mktemp("model-v2") / "histohelper-untrained-seed1.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        export_model(out, seed=1, variants=(), calibration_patches=16, onnx=False)
    return out
