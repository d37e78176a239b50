"""Which stain normalisation a call gets (server/convert.py ``stain_choice``, the rules
in the proto's comments), that the result cache keys on it, and that a failed fit is a
QC warning rather than an error. No server: pure functions over a real manifest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from histohelper.errors import InvalidOptionsError
from histohelper.server import convert
from histohelper.server.cache import ModelIdentity, analysis_key
from histohelper.server.pipeline import AnalysisSpec, Analyzer
from histohelper.server.runtime.manifest import (
    Manifest,
    StainDeclaration,
    StainTarget,
    read_manifest,
)
from histohelper.server.tiling import TilingOptions
from histohelper.server.tiling import stain as st
from histohelper.v1 import slide_analysis_pb2 as pb

MODEL_MACENKO = st.StainStats(
    stain_matrix=(0.6, 0.7, 0.39, 0.2, 0.8, 0.57), max_concentrations=(1.5, 0.9)
)
SERVER_TARGETS = {
    "macenko": st.StainStats(
        stain_matrix=(0.55, 0.72, 0.42, 0.22, 0.79, 0.57), max_concentrations=(1.8, 1.1)
    ),
    "reinhard": st.StainStats(means=(8.5, -0.1, 0.04), stds=(0.6, 0.1, 0.03)),
}


@pytest.fixture(scope="module")
def plain(model_artifact: Path) -> Manifest:
    return read_manifest(model_artifact)


@pytest.fixture(scope="module")
def declared(plain: Manifest) -> Manifest:
    """The same model, declaring Macenko to its export-time reference."""
    decl = StainDeclaration(
        method="macenko",
        reference="model",
        targets={"macenko": StainTarget(**MODEL_MACENKO.as_dict())},
    )
    return plain.model_copy(update={"stain_normalization": decl})


def _msg(method: int = 0, reference: int = 0) -> pb.StainNormalization:
    return pb.StainNormalization(method=method, reference=reference)


M, R = pb.STAIN_METHOD_MACENKO, pb.STAIN_METHOD_REINHARD
PUB, MOD, SRV = pb.STAIN_REFERENCE_PUBLISHED, pb.STAIN_REFERENCE_MODEL, pb.STAIN_REFERENCE_SERVER


@pytest.mark.parametrize(
    ("model", "server", "msg", "want"),
    [
        ("plain", False, _msg(), ("none", "", "default")),
        ("plain", False, _msg(pb.STAIN_METHOD_NONE), ("none", "", "request")),
        ("plain", False, _msg(M), ("macenko", "published", "request")),
        ("plain", True, _msg(M), ("macenko", "server", "request")),
        ("plain", True, _msg(R, PUB), ("reinhard", "published", "request")),
        ("declared", False, _msg(), ("macenko", "model", "model")),
        ("declared", True, _msg(), ("macenko", "model", "model")),
        ("declared", True, _msg(0, SRV), ("macenko", "server", "model")),
        ("declared", False, _msg(M), ("macenko", "model", "request")),
        ("declared", True, _msg(M), ("macenko", "server", "request")),
        ("declared", False, _msg(R), ("reinhard", "published", "request")),
        ("declared", False, _msg(pb.STAIN_METHOD_NONE), ("none", "", "request")),
    ],
    ids=[
        "nothing",
        "none-asked",
        "macenko-published",
        "macenko-server-first",
        "reinhard-published-named",
        "declared-applies",
        "declared-keeps-its-reference",
        "declared-with-server-reference",
        "macenko-model-reference",
        "server-before-model",
        "no-model-reinhard-target",
        "declared-but-none-asked",
    ],
)
def test_stain_choice_follows_the_proto_rules(
    request: pytest.FixtureRequest,
    model: str,
    server: bool,
    msg: pb.StainNormalization,
    want: tuple[str, str, str],
) -> None:
    manifest = request.getfixturevalue(model)
    choice = convert.stain_choice(msg, manifest, SERVER_TARGETS if server else {})
    assert (choice.method, choice.reference, choice.source) == want
    expected_target = {
        "published": st.PUBLISHED.get(choice.method),
        "server": SERVER_TARGETS.get(choice.method),
        "model": MODEL_MACENKO,
        "": st.StainStats(),
    }[choice.reference]
    assert choice.target == expected_target


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        (_msg(M, MOD), "manifest records no macenko"),
        (_msg(R, SRV), "no stain reference image"),
        (_msg(pb.STAIN_METHOD_VAHADANE), "Vahadane"),
        (_msg(0, PUB), "needs a stain method"),
        (_msg(pb.STAIN_METHOD_NONE, MOD), "none applies no stain reference"),
        (_msg(99), "unknown stain_normalization.method"),
        (_msg(M, 99), "unknown stain_normalization.reference"),
    ],
    ids=[
        "model-missing",
        "server-missing",
        "vahadane",
        "no-method",
        "none-with-reference",
        "bad-method",
        "bad-ref",
    ],
)
def test_impossible_choices_are_refused(
    plain: Manifest, msg: pb.StainNormalization, words: str
) -> None:
    with pytest.raises(InvalidOptionsError, match=words):
        convert.stain_choice(msg, plain, {})


def test_the_client_refuses_a_reference_for_method_none() -> None:
    from histohelper.client import AnalysisOptions
    from histohelper.errors import InvalidOptionsError as ClientInvalidOptions

    with pytest.raises(ClientInvalidOptions, match="none applies no stain reference"):
        AnalysisOptions(stain_normalization="none", stain_reference="model")


def test_a_declaration_of_model_reference_needs_its_target() -> None:
    with pytest.raises(ValueError, match="needs a macenko target"):
        StainDeclaration(method="macenko", reference="model")


def _spec(choice: st.StainChoice) -> AnalysisSpec:
    return AnalysisSpec("r", Path("/slides/a.svs"), TilingOptions(), 32, stain=choice)


def test_the_result_cache_keys_on_the_stain_choice() -> None:
    model = ModelIdentity("a" * 64, "torchscript", "fp32", "cpu", 1)
    key = {
        name: analysis_key(_spec(choice), "b" * 64, model, "code")
        for name, choice in {
            "off": st.NO_STAIN,
            "macenko": st.StainChoice("macenko", "published", "request", st.PUBLISHED["macenko"]),
            "reinhard": st.StainChoice(
                "reinhard", "published", "request", st.PUBLISHED["reinhard"]
            ),
            "macenko-server": st.StainChoice(
                "macenko", "server", "request", SERVER_TARGETS["macenko"]
            ),
        }.items()
    }
    assert len(set(key.values())) == 4, key
    again = st.StainChoice("macenko", "published", "request", st.PUBLISHED["macenko"])
    assert analysis_key(_spec(again), "b" * 64, model, "code") == key["macenko"]


def test_a_failed_fit_is_a_qc_warning(real_slide: Path) -> None:
    """Too few tissue pixels: no normalisation, the warning in the applied record and
    among the plan's QC warnings, no error."""
    from histohelper.server.tiling import open_slide, plan_tiling

    with open_slide(real_slide) as slide:
        plan = plan_tiling(slide, TilingOptions())
    assert plan.tissue_rgb.shape[0] > 10_000 and plan.tissue_rgb.dtype == np.uint8
    choice = st.StainChoice("macenko", "published", "request", st.PUBLISHED["macenko"])
    normalizer, applied, planned = Analyzer.fit_stain(_spec(choice), plan)
    assert normalizer is not None and applied.method == "macenko" and not applied.warning
    assert planned.warnings == plan.warnings
    starved = replace(plan, tissue_rgb=plan.tissue_rgb[:100])
    normalizer, applied, planned = Analyzer.fit_stain(_spec(choice), starved)
    assert normalizer is None and applied.method == "none"
    assert "not applied" in applied.warning and applied.warning in planned.warnings


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"stain_method": "vahadane"}, "unknown stain method 'vahadane'"),
        ({"stain_reference": "reference.png"}, "needs a stain method"),
    ],
    ids=["unknown-method", "reference-without-method"],
)
def test_export_refuses_bad_stain_options(kwargs: dict[str, str], words: str) -> None:
    from histohelper.model_export.export import ExportOptions

    with pytest.raises(InvalidOptionsError, match=words):
        ExportOptions(**kwargs)  # type: ignore[arg-type]


def test_export_cli_passes_the_stain_flags() -> None:
    import argparse

    from histohelper.model_export.cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    args = parser.parse_args(
        ["export", "m.pt", "--stain-method", "reinhard", "--stain-reference", "ref.png"]
    )
    assert (args.stain_method, args.stain_reference) == ("reinhard", "ref.png")


def test_a_published_declaration_needs_no_image() -> None:
    from histohelper.model_export.export import stain_declaration

    assert stain_declaration("none", None) is None
    declared = stain_declaration("reinhard", None)
    assert declared is not None
    assert (declared.method, declared.reference, declared.targets) == ("reinhard", "published", {})


def test_serve_refuses_an_unusable_stain_reference(tmp_path: Path) -> None:
    """``serve --stain-reference`` fits the image before anything loads: an unreadable
    one, or one without stained tissue, stops the command with a clear message (run as
    a child process: ``serve`` configures the process's logging)."""
    import subprocess
    import sys

    import cv2

    unreadable = tmp_path / "bad.png"
    unreadable.write_bytes(b"not an image")
    glass = tmp_path / "glass.png"
    assert cv2.imwrite(str(glass), np.full((64, 64, 3), 240, np.uint8))
    for image, words in ((unreadable, "could not be read"), (glass, "at least 500")):
        args = ["serve", "--slide-root", str(tmp_path), "--stain-reference", str(image)]
        done = subprocess.run(
            [sys.executable, "-m", "histohelper.cli", *args, "--model", str(tmp_path / "no.pt")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0
        assert "--stain-reference" in done.stderr and words in done.stderr, done.stderr
