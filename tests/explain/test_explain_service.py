"""ExplainPatches, return_cams and the explain CLI against the session's real server."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from histohelper.cli import main as cli_main
from histohelper.client import SlideClient
from histohelper.client.explain import local_probabilities
from histohelper.client.options import AnalysisOptions
from histohelper.client.render import overlay
from histohelper.errors import InvalidOptionsError, SlideNotFoundError

CMU = "real/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def cam_result(analysis_server):
    with SlideClient(analysis_server.target, timeout=300) as client:
        return client.analyze(CMU, AnalysisOptions(return_attention=True, return_cams=True))


def test_top_k_by_attention_matches_analysis(analysis_server, cam_result) -> None:
    with SlideClient(analysis_server.target, timeout=300) as client:
        explanations = client.explain(CMU, top_k=5, rank_by="attention")
    assert [e.rank for e in explanations] == list(range(5))
    p = cam_result.patches
    expected = np.argsort(-p.attention, kind="stable")[:5]
    assert [e.patch_index for e in explanations] == [int(p.patch_index[i]) for i in expected]
    for ex, i in zip(explanations, expected, strict=True):
        assert ex.attention is not None and abs(ex.attention - float(p.attention[i])) < 1e-5
        assert ex.class_name == "malignant"
        assert abs(ex.class_probability - float(p.probabilities[i, 1])) < 1e-4
        assert (ex.x_l0, ex.y_l0) == (float(p.x_l0[i]), float(p.y_l0[i]))
        image = ex.image_rgb()
        assert image.shape == (224, 224, 3)
        assert ex.grad_cam.shape == (7, 7) and float(ex.grad_cam.min()) >= 0.0
        # Grad-CAM = relu(CAM of the class) / 49, from the CAMs AnalyzeSlide streamed.
        np.testing.assert_allclose(
            ex.grad_cam, np.maximum(p.cams[i, 1], 0) / 49, rtol=1e-3, atol=1e-5
        )


def test_cams_are_consistent_with_logits_and_the_runtime(cam_result, served_runtime) -> None:
    p = cam_result.patches
    assert p.cams is not None and p.logits is not None
    assert p.cams.shape == (len(p), 2, 7, 7)
    e = np.exp(p.logits - p.logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), p.probabilities, atol=1e-5)
    local = local_probabilities(p.cams, p.logits)
    np.testing.assert_allclose(local.sum(1), 1.0, atol=1e-5)
    bias = p.logits - p.cams.mean((2, 3))
    assert np.ptp(bias, axis=0).max() < 1e-3  # one fc bias for every patch


def test_cam_heatmap_is_sub_patch_and_nan_off_tissue(cam_result) -> None:
    heat, l0_per_px = cam_result.cam_heatmap("malignant")
    p = cam_result.patches
    assert l0_per_px == pytest.approx(float(np.median(p.width_l0)) / 7)
    assert heat.shape == (
        int(np.ceil(cam_result.slide.height_l0 / l0_per_px)),
        int(np.ceil(cam_result.slide.width_l0 / l0_per_px)),
    )
    covered = np.isfinite(heat)
    # 7 x 7 cells per patch; no overlap at the default stride.
    assert abs(int(covered.sum()) - 49 * len(p)) <= 49 * len(p) * 0.1
    assert float(np.nanmin(heat)) >= 0.0 and float(np.nanmax(heat)) <= 1.0
    assert not np.isfinite(heat[0, 0]) and not np.isfinite(heat[-1, 0])
    image = overlay(cam_result, "malignant", cams=True, legend=False)
    assert image.shape[:2] == (cam_result.thumbnail.height_px, cam_result.thumbnail.width_px)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"patch_indices": [10_000]}, InvalidOptionsError),
        ({"class_name": "tumour"}, InvalidOptionsError),
        ({"top_k": 0}, InvalidOptionsError),
    ],
    ids=["index-out-of-bag", "unknown-class", "zero-k"],
)
def test_explain_errors(analysis_server, kwargs: dict, error: type) -> None:
    with SlideClient(analysis_server.target, timeout=60) as client, pytest.raises(error):
        client.explain(CMU, **kwargs)


def test_explain_missing_slide(analysis_server) -> None:
    with (
        SlideClient(analysis_server.target, timeout=60) as client,
        pytest.raises(SlideNotFoundError),
    ):
        client.explain("real/none.svs")


def test_explain_cli_writes_gallery_and_heatmap(
    analysis_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "explain"
    rc = cli_main(
        ["explain", CMU, "--server", analysis_server.target, "--out", str(out), "--top-k", "4"]
    )
    captured = capsys.readouterr()
    assert rc == 0
    # Progress: three step lines on stderr, in order, before the result line on stdout.
    steps = [ln for ln in captured.err.splitlines() if ln.startswith("explain: ")]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"], captured.err
    assert "top 4 patches by attention" in steps[1]
    assert "[UNTRAINED: patch classifier, MIL slide head]" in captured.out
    gallery = cv2.imread(str(out / "gallery.png"))
    assert gallery is not None and gallery.shape[0] > 224 and gallery.shape[1] >= 4 * 448
    summary = json.loads((out / "explanations.json").read_text())
    assert len(summary["explanations"]) == 4 and summary["untrained"] is True
    attention = [e["attention"] for e in summary["explanations"]]
    assert attention == sorted(attention, reverse=True)
    with np.load(out / "cam_heatmap.npz") as npz:
        assert npz["heatmap"].ndim == 2 and float(npz["l0_per_px"]) > 0
    assert (out / "cam_overlay.png").is_file()


def test_async_client_explains_like_the_sync_client(analysis_server) -> None:
    import asyncio

    from histohelper.client import AsyncSlideClient

    async def run() -> list:
        async with AsyncSlideClient(analysis_server.target, timeout=120) as client:
            return await client.explain(CMU, patch_indices=[0, 2], class_name="benign")

    got = asyncio.run(run())
    with SlideClient(analysis_server.target, timeout=120) as client:
        want = client.explain(CMU, patch_indices=[0, 2], class_name="benign")
    assert [e.patch_index for e in got] == [0, 2]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.grad_cam, b.grad_cam, atol=1e-6)
