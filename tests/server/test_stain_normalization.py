"""Stain normalisation end to end (issue 21), over real servers on loopback.

The slide root holds a copy of the real ``CMU-1-Small-Region.svs`` and a stain-perturbed
copy of it made here (HED jitter of documented strength: tests/stain_support.py). The
model is the session's seeded UNTRAINED artifact: its embeddings mean nothing
diagnostically, but they are a fixed function of the pixels and respond to colour, so
"the two copies' embeddings agree more" is a meaningful measure of what normalisation
removes.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from stain_support import PERTURBATION, measure_agreement, write_perturbed_copy

from histohelper.client import AnalysisOptions, SlideClient
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

pytest.importorskip("skimage", reason="scikit-image (dev extra) makes the perturbed copy")

ORIGINAL, PERTURBED = "original.svs", "perturbed.tif"
#: Patches at 2 um/px where the test is about what is reported, not the figures: a dozen
#: patches instead of about fifty (the fit reads the tissue mask's level either way).
FAST_MPP = 2.0


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory, real_slide: Path) -> Path:
    root = tmp_path_factory.mktemp("stain-slides")
    shutil.copyfile(real_slide, root / ORIGINAL)  # a temporary copy, never in the repo
    write_perturbed_copy(real_slide, root / PERTURBED, PERTURBATION)
    return root


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory: pytest.TempPathFactory, real_slide: Path) -> Path:
    """A reference image: a 600 px region of the real slide's tissue, as PNG."""
    import openslide

    with openslide.OpenSlide(str(real_slide)) as slide:
        rgb = np.asarray(slide.read_region((600, 800), 0, (600, 600)).convert("RGB"))
    path = tmp_path_factory.mktemp("stain-ref") / "reference.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def server(served_runtime, model_artifact: Path, slide_root: Path):
    """One server for the module's tests that need no special configuration."""
    yield from _serving(model_artifact, served_runtime, slide_root)


def _serving(artifact: Path, runtime, slide_root: Path, **config: object):
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    values: dict[str, object] = {
        "model_path": artifact,
        "slide_root": slide_root,
        "port": 0,
        "precision": "fp32",
        "grace_s": 2.0,
        **config,
    }
    running = start_server(ServerConfig(**values), runtime=runtime)  # type: ignore[arg-type]
    try:
        yield running
    finally:
        running.stop(grace=0, drain=0)


def _target(running) -> str:
    return f"127.0.0.1:{running.port}"


def _started(target: str, path: str, stain: pb.StainNormalization | None) -> pb.AnalysisStarted:
    """The AnalysisStarted of a call (the rest of the stream is read and dropped)."""
    options = pb.AnalysisOptions(return_attention=False)
    options.target_resolution.mpp = FAST_MPP
    if stain is not None:
        options.stain_normalization.CopyFrom(stain)
    request = pb.AnalyzeSlideRequest(slide_path=path, options=options)
    with grpc.insecure_channel(target) as channel:
        events = list(pb_grpc.SlideAnalysisServiceStub(channel).AnalyzeSlide(request, timeout=300))
    assert events[-1].WhichOneof("event") == "completed"
    return events[0].started


def _code_and_message(target: str, stain: pb.StainNormalization) -> tuple[grpc.StatusCode, str]:
    request = pb.AnalyzeSlideRequest(
        slide_path=ORIGINAL, options=pb.AnalysisOptions(stain_normalization=stain)
    )
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.SlideAnalysisServiceStub(channel).AnalyzeSlide(request, timeout=60))
    return info.value.code(), info.value.details() or ""


def test_macenko_fit_is_reported_in_analysis_started(server) -> None:
    started = _started(
        _target(server),
        PERTURBED,
        pb.StainNormalization(method=pb.STAIN_METHOD_MACENKO),
    )
    stain = started.stain
    assert stain.method == pb.STAIN_METHOD_MACENKO
    assert stain.reference == pb.STAIN_REFERENCE_PUBLISHED  # no server or model reference
    assert stain.source == "request" and stain.warning == ""
    matrix = np.asarray(stain.fitted_stain_matrix).reshape(2, 3)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    assert matrix[0, 0] > matrix[1, 0]  # hematoxylin absorbs more red than eosin
    assert len(stain.fitted_max_concentrations) == 2 and not stain.fitted_means


def test_without_a_request_or_declaration_nothing_is_applied(server) -> None:
    stain = _started(_target(server), ORIGINAL, None).stain
    assert (stain.method, stain.source) == (pb.STAIN_METHOD_NONE, "default")
    assert not stain.fitted_stain_matrix


@pytest.mark.parametrize(
    ("stain", "words"),
    [
        (
            pb.StainNormalization(
                method=pb.STAIN_METHOD_MACENKO, reference=pb.STAIN_REFERENCE_MODEL
            ),
            "manifest records no macenko stain reference",
        ),
        (
            pb.StainNormalization(
                method=pb.STAIN_METHOD_REINHARD, reference=pb.STAIN_REFERENCE_SERVER
            ),
            "no stain reference image",
        ),
        (pb.StainNormalization(method=pb.STAIN_METHOD_VAHADANE), "Vahadane"),
        (pb.StainNormalization(reference=pb.STAIN_REFERENCE_PUBLISHED), "needs a stain method"),
    ],
    ids=["model-reference-missing", "server-reference-missing", "vahadane", "no-method"],
)
def test_impossible_combinations_are_invalid_options(
    server, stain: pb.StainNormalization, words: str
) -> None:
    code, message = _code_and_message(_target(server), stain)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in message


def test_operator_reference_is_the_default_target(
    served_runtime, model_artifact: Path, slide_root: Path, reference_png: Path
) -> None:
    for running in _serving(
        model_artifact, served_runtime, slide_root, stain_reference=reference_png
    ):
        stain = _started(
            _target(running), ORIGINAL, pb.StainNormalization(method=pb.STAIN_METHOD_REINHARD)
        ).stain
    assert (stain.method, stain.reference) == (
        pb.STAIN_METHOD_REINHARD,
        pb.STAIN_REFERENCE_SERVER,
    )
    assert len(stain.fitted_means) == 3 and len(stain.fitted_stds) == 3


def test_model_declared_normalisation_applies_by_default(
    slide_root: Path, reference_png: Path, tmp_path: Path
) -> None:
    """An artifact exported with ``stain_method="macenko"`` and a reference image: the
    server applies it unasked and says so (source "model"), with the client's options
    and result reporting it too."""
    from histohelper.model_export.export import UntrainedModelWarning, export_model
    from histohelper.server.runtime import load_runtime

    artifact = tmp_path / "stained.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        manifest = export_model(
            artifact,
            seed=0,
            variants=(),
            onnx=False,
            check_served=False,
            stain_method="macenko",
            stain_reference=reference_png,
        )
    declared = manifest.stain_normalization
    assert declared is not None and declared.reference == "model"
    assert set(declared.targets) == {"macenko", "reinhard"}
    assert declared.reference_sha256 is not None and len(declared.reference_sha256) == 64
    runtime = load_runtime(artifact, device="cpu", precision="fp32")
    for running in _serving(artifact, runtime, slide_root):
        result, asked = _declared_and_refused(_target(running))
    assert result.stain is not None
    assert (result.stain.method, result.stain.reference, result.stain.source) == (
        "macenko",
        "model",
        "model",
    )
    assert asked.stain is not None
    assert (asked.stain.method, asked.stain.source) == ("none", "request")
    # The normalisation changed what the model saw.
    assert not np.array_equal(result.patches.probabilities, asked.patches.probabilities)


def _declared_and_refused(target: str):
    """The default analysis (the model's declaration) and one that asks for none."""
    with SlideClient(target) as client:
        result = client.analyze(
            ORIGINAL, AnalysisOptions(return_attention=False, target_mpp=FAST_MPP)
        )
        asked = client.analyze(
            ORIGINAL,
            AnalysisOptions(
                return_attention=False, target_mpp=FAST_MPP, stain_normalization="none"
            ),
        )
    return result, asked


def test_classify_patches_fits_on_the_request_images(server, real_slide: Path) -> None:
    import openslide

    with openslide.OpenSlide(str(real_slide)) as slide:
        crops = [
            np.asarray(slide.read_region((x, y), 0, (224, 224)).convert("RGB"))
            for x, y in [(700, 900), (1000, 1200), (900, 1600), (1300, 1900)]
        ]
    images = [
        pb.PatchImage(id=str(i), raw=pb.RawImage(width_px=224, height_px=224, rgb=c.tobytes()))
        for i, c in enumerate(crops)
    ]

    def classify(stain: pb.StainNormalization | None) -> pb.ClassifyPatchesResponse:
        request = pb.ClassifyPatchesRequest(images=images)
        if stain is not None:
            request.stain_normalization.CopyFrom(stain)
        with grpc.insecure_channel(_target(server)) as channel:
            stub = pb_grpc.SlideAnalysisServiceStub(channel)
            return next(iter(stub.ClassifyPatches(iter([request]), timeout=60)))

    plain = classify(None)
    normed = classify(pb.StainNormalization(method=pb.STAIN_METHOD_MACENKO))
    assert plain.stain.method == pb.STAIN_METHOD_NONE
    assert normed.stain.method == pb.STAIN_METHOD_MACENKO and normed.stain.source == "request"
    assert len(normed.stain.fitted_stain_matrix) == 6
    assert [p.probabilities for p in plain.predictions] != [
        p.probabilities for p in normed.predictions
    ]


@pytest.mark.slow
def test_normalisation_brings_the_perturbed_copy_closer(server) -> None:
    """The acceptance figure of issue 21 (README "Stain normalisation"): with Macenko
    or Reinhard, the served embeddings of the two copies agree more and their patch
    probabilities differ less than without normalisation."""
    with SlideClient(_target(server)) as client:
        figures = {
            m: measure_agreement(client, ORIGINAL, PERTURBED, m)
            for m in (None, "macenko", "reinhard")
        }
    off = figures[None]
    assert off["cells"] >= 40  # the copies' grids agree on nearly every cell
    for method in ("macenko", "reinhard"):
        on = figures[method]
        assert on["cosine"] > off["cosine"], (method, figures)
        assert on["prob_abs_diff"] < off["prob_abs_diff"], (method, figures)


def test_explained_patches_are_normalised_like_the_analysis(server) -> None:
    """ExplainPatches applies the request's normalisation too: its patch images are what
    the model saw (Macenko's differ from the unnormalised read of the same patch)."""

    def explained(stain: pb.StainNormalization | None) -> pb.PatchExplanation:
        options = pb.AnalysisOptions()
        options.target_resolution.mpp = FAST_MPP
        if stain is not None:
            options.stain_normalization.CopyFrom(stain)
        request = pb.ExplainPatchesRequest(
            slide_path=PERTURBED, options=options, patches=pb.PatchIndexSelection(patch_index=[0])
        )
        with grpc.insecure_channel(_target(server)) as channel:
            stub = pb_grpc.SlideAnalysisServiceStub(channel)
            (reply,) = list(stub.ExplainPatches(request, timeout=120))
        return reply.explanation

    plain = explained(None)
    normed = explained(pb.StainNormalization(method=pb.STAIN_METHOD_MACENKO))
    assert (plain.x_l0, plain.y_l0) == (normed.x_l0, normed.y_l0)
    a = cv2.imdecode(np.frombuffer(plain.image_jpeg, np.uint8), cv2.IMREAD_COLOR)
    b = cv2.imdecode(np.frombuffer(normed.image_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(a.astype(int) - b).mean() > 2.0


def test_explain_says_what_normalisation_was_applied(server) -> None:
    """ExplainPatchesResponse.stain reports the fit the explained images got: the same
    as AnalysisStarted.stain for the same slide and options; "none" when nothing asked.
    The SDK (sync and async) carries it as PatchExplanation.stain."""
    import asyncio

    from histohelper.client import AsyncSlideClient

    macenko = pb.StainNormalization(method=pb.STAIN_METHOD_MACENKO)
    started = _started(_target(server), PERTURBED, macenko).stain
    options = AnalysisOptions(target_mpp=FAST_MPP, stain_normalization="macenko")
    with SlideClient(_target(server), timeout=120) as client:
        normed = client.explain(PERTURBED, patch_indices=[0, 1], options=options)
        (plain,) = client.explain(
            PERTURBED, patch_indices=[0], options=AnalysisOptions(target_mpp=FAST_MPP)
        )
    assert len(normed) == 2
    for ex in normed:
        assert ex.stain is not None
        assert (ex.stain.method, ex.stain.reference, ex.stain.source) == (
            "macenko",
            "published",
            "request",
        )
        np.testing.assert_allclose(ex.stain.fitted_stain_matrix, started.fitted_stain_matrix)
        np.testing.assert_allclose(
            ex.stain.fitted_max_concentrations, started.fitted_max_concentrations
        )
    assert plain.stain is not None
    assert (plain.stain.method, plain.stain.source) == ("none", "default")

    async def run() -> list:
        async with AsyncSlideClient(_target(server), timeout=120) as client:
            return await client.explain(PERTURBED, patch_indices=[0], options=options)

    (aio,) = asyncio.run(run())
    assert aio.stain == normed[0].stain


def test_explain_cli_records_the_normalisation(server, tmp_path: Path) -> None:
    """``histohelper explain --stain-normalization reinhard``: explanations.json and the
    report's gallery say what the explained images got."""
    import json

    from histohelper.cli import main

    out = tmp_path / "explain"
    args = ["explain", PERTURBED, "--server", _target(server), "--out", str(out), "-q"]
    assert main([*args, "--top-k", "2", "--stain-normalization", "reinhard"]) == 0
    stain = json.loads((out / "explanations.json").read_text())["stain_normalization"]
    assert (stain["method"], stain["reference"], stain["source"]) == (
        "reinhard",
        "published",
        "request",
    )
    assert len(stain["fitted_means"]) == 3 and len(stain["fitted_stds"]) == 3
    gallery = (out / "report.html").read_text().split("<h2>Top patches</h2>")[1]
    assert "Stain normalisation: reinhard to the published reference (asked by" in gallery


def test_analyze_cli_records_the_normalisation(server, tmp_path: Path) -> None:
    """``histohelper analyze --stain-normalization macenko``: summary.json and report.html
    say what was applied."""
    import json

    from histohelper.cli import main

    out = tmp_path / "out"
    args = ["analyze", PERTURBED, "--server", _target(server), "--out", str(out), "-q"]
    args += ["--mpp", str(FAST_MPP), "--stain-normalization", "macenko"]
    assert main([*args, "--stain-reference", "published"]) == 0
    stain = json.loads((out / "summary.json").read_text())["stain_normalization"]
    assert (stain["method"], stain["reference"], stain["source"]) == (
        "macenko",
        "published",
        "request",
    )
    assert len(stain["fitted_stain_matrix"]) == 6 and "warning" not in stain
    assert (
        "macenko to the published reference (asked by the request)"
        in (out / "report.html").read_text()
    )


def test_cohort_manifest_stain_columns(tmp_path: Path) -> None:
    """A cohort manifest may set the normalisation per slide (an empty cell takes the
    command line's); a bad name is refused before the run."""
    from histohelper.client.cohort_runner import options_identity, slides_from_manifest
    from histohelper.cohort_csv import CohortError

    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        "slide,stain_normalization,stain_reference\nreal/one.svs,macenko,server\nreal/two.svs,,\n"
    )
    base = AnalysisOptions(stain_normalization="reinhard")
    one, two = slides_from_manifest(manifest, base, upload=False)
    assert one.options is not None
    assert (one.options.stain_normalization, one.options.stain_reference) == ("macenko", "server")
    assert two.options is None  # the command line's options
    render: dict[str, object] = {}
    assert options_identity(one.options, render) != options_identity(base, render)  # type: ignore[arg-type]
    manifest.write_text("slide,stain_normalization\nreal/one.svs,vahadane\n")
    with pytest.raises(CohortError, match="stain method"):
        slides_from_manifest(manifest, base, upload=False)


def test_sdk_classify_asks_for_the_normalisation(server, real_slide: Path) -> None:
    import openslide

    with openslide.OpenSlide(str(real_slide)) as slide:
        images = [
            (str(i), np.asarray(slide.read_region((x, 1200), 0, (224, 224)).convert("RGB")))
            for i, x in enumerate((700, 1000, 1300))
        ]
    white = np.full((224, 224, 3), 255, np.uint8)
    with SlideClient(_target(server)) as client:
        plain_preds = list(client.classify(images))
        normed_preds = list(client.classify(images, stain_normalization="reinhard"))
        blank = list(client.classify([("white", white)], stain_normalization="macenko"))
        with pytest.raises(ValueError, match="stain method"):
            client.classify(images, stain_normalization="vahadane")  # type: ignore[arg-type]
    plain = [p.probabilities for p in plain_preds]
    normed = [p.probabilities for p in normed_preds]
    assert len(plain) == len(normed) == 3
    assert not np.allclose(np.stack(plain), np.stack(normed))
    # Each prediction says what normalisation its request got (finding 10).
    assert {(p.stain.method, p.stain.source) for p in normed_preds if p.stain} == {
        ("reinhard", "request")
    }
    assert len(normed_preds[0].stain.fitted_means) == 3  # type: ignore[union-attr]
    assert all(p.stain is not None and p.stain.method == "none" for p in plain_preds)
    assert blank[0].stain is not None and blank[0].stain.method == "none"
    assert blank[0].stain.warning  # the fit failed on a white patch: not silently skipped


def test_async_sdk_classify_says_what_normalisation_was_applied(server, real_slide: Path) -> None:
    import asyncio

    import openslide

    from histohelper.client import AsyncSlideClient

    with openslide.OpenSlide(str(real_slide)) as slide:
        images = [("0", np.asarray(slide.read_region((1000, 1200), 0, (224, 224)).convert("RGB")))]

    async def run() -> list:
        async with AsyncSlideClient(_target(server)) as client:
            return [p async for p in client.classify(images, stain_normalization="macenko")]

    (pred,) = asyncio.run(run())
    assert pred.stain is not None and pred.stain.method == "macenko"
    assert pred.stain.source == "request" and len(pred.stain.fitted_stain_matrix) == 6


def test_a_failed_fit_leaves_the_patches_unnormalised_with_a_warning(
    server, slide_root: Path
) -> None:
    """Pale tissue (no pixel with an optical density of 0.15 in every channel): the
    tissue mask keeps it, Macenko cannot be fitted; the analysis completes unnormalised
    and says why, in AnalysisStarted.stain and in the QC warnings."""
    import synthetic_slides as syn

    img = syn.glass_rgb(900, 900, seed=3)
    pale = np.array([232, 188, 214], np.float32) + 6 * syn.smooth_noise(500, 500, 4)[..., None]
    img[200:700, 200:700] = pale.clip(0, 255).astype(np.uint8)
    syn.write_slide(slide_root / "pale.tif", img, [(225, 225)], mpp=0.5)
    options = pb.AnalysisOptions(
        stain_normalization=pb.StainNormalization(method=pb.STAIN_METHOD_MACENKO)
    )
    request = pb.AnalyzeSlideRequest(slide_path="pale.tif", options=options)
    with grpc.insecure_channel(_target(server)) as channel:
        events = list(pb_grpc.SlideAnalysisServiceStub(channel).AnalyzeSlide(request, timeout=120))
    started, completed = events[0].started, events[-1].completed
    assert started.qc.patch_count > 0, "the pale tissue must be tissue for this test"
    assert started.stain.method == pb.STAIN_METHOD_NONE
    assert started.stain.source == "request"
    assert "macenko stain normalisation not applied" in started.stain.warning
    assert started.stain.warning in completed.qc.warnings
    assert completed.outcome == pb.ANALYSIS_OUTCOME_COMPLETED
