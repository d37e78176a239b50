"""Served as trained: a train-mil checkpoint exported with its provenance and dropout,
and Monte-Carlo dropout uncertainty over a real server (issue 17)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from histohelper.errors import InvalidOptionsError
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

CMU = "real/CMU-1-Small-Region.svs"
DROPOUT = 0.25
CLASSES = ["pulmonary", "cerebral"]
COHORT_SHA = "ab" * 32
FEATURE_HASH = "cd" * 32


def _head_checkpoint(directory: Path) -> Path:
    """A random gated-attention head in train-mil's checkpoint layout, with report.json."""
    from histohelper.model_export.modules import GatedAttentionMIL

    torch.manual_seed(7)
    head = GatedAttentionMIL(512, 128, len(CLASSES), DROPOUT)
    for p in head.parameters():  # larger weights: passes differ visibly
        p.data.mul_(4.0)
    ckpt = directory / "mil_head.pt"
    torch.save(
        {
            "state_dict": head.state_dict(),
            "slide_classes": CLASSES,
            "attention_dim": 128,
            "embedding_dim": 512,
            "dropout": DROPOUT,
            "epochs": 12,
            "seed": 3,
            "feature_model_hash": FEATURE_HASH,
            "cohort_sha256": COHORT_SHA,
        },
        ckpt,
    )
    report = {
        "schema": "histohelper.train_mil.report/1",
        "cohort_sha256": COHORT_SHA,
        "scheme": "patient-level stratified 5-fold",
        "folds": [{"fold": i} for i in range(5)],
        "n_slides": 40,
        "n_patients": 38,
        "pooled_out_of_fold": {
            "auc": {"value": 0.93, "ci95": [0.85, 0.99]},
            "balanced_accuracy": {"value": 0.875, "ci95": [0.8, 0.95]},
        },
    }
    (directory / "report.json").write_text(json.dumps(report))
    return ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact exported with --mil-weights of a dropout-0.25 head, the checkpoint)."""
    from histohelper.model_export.export import UntrainedModelWarning, export_model

    d = tmp_path_factory.mktemp("mc")
    ckpt = _head_checkpoint(d)
    out = d / "trained-head.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        export_model(out, seed=0, variants=(), calibration_patches=16, mil_weights=ckpt)
    return out, ckpt


@pytest.fixture(scope="module")
def mc_runtime(trained: tuple[Path, Path]):
    from histohelper.server.runtime import load_runtime

    return load_runtime(trained[0], device="cpu", precision="fp32")


# --- provenance -----------------------------------------------------------------------


def test_manifest_records_training_provenance(trained: tuple[Path, Path]) -> None:
    from histohelper.server.runtime.manifest import FORMAT_VERSION, read_manifest

    m = read_manifest(trained[0])
    assert m.format_version == FORMAT_VERSION >= 3
    assert m.slide_classes == tuple(CLASSES)  # from the checkpoint, no --slide-classes
    assert m.untrained_parts == ("patch",)
    assert m.mil_dropout == DROPOUT
    t = m.mil_training
    assert t is not None
    assert (t.cohort_sha256, t.feature_model_hash) == (COHORT_SHA, FEATURE_HASH)
    assert (t.seed, t.epochs, t.dropout, t.folds) == (3, 12, DROPOUT, 5)
    assert t.scheme == "patient-level stratified 5-fold"
    assert (t.oof_auc, t.oof_auc_ci95) == (0.93, (0.85, 0.99))
    assert (t.oof_balanced_accuracy, t.oof_balanced_accuracy_ci95) == (0.875, (0.8, 0.95))
    assert t.report_sha256 is not None and len(t.report_sha256) == 64
    assert "aggregate_mc" in m.methods


def test_older_manifests_still_load(trained: tuple[Path, Path]) -> None:
    from histohelper.server.runtime.manifest import FORMAT_VERSION, parse_manifest, read_manifest

    raw = json.loads(read_manifest(trained[0]).to_json())
    for key in ("mil_dropout", "mil_training"):
        raw.pop(key)
    raw["format_version"] = 2
    m = parse_manifest(json.dumps(raw))
    assert (m.mil_dropout, m.mil_training, m.format_version) == (0.0, None, FORMAT_VERSION)


def test_slide_classes_must_match_the_checkpoint(trained: tuple[Path, Path]) -> None:
    from histohelper.model_export.export import ExportOptions

    with pytest.raises(InvalidOptionsError, match="differ from the MIL checkpoint"):
        ExportOptions(mil_weights=trained[1], slide_classes=["cerebral", "pulmonary"])
    ok = ExportOptions(mil_weights=trained[1], slide_classes=CLASSES)
    assert ok.slide_class_names == tuple(CLASSES)
    with pytest.raises(InvalidOptionsError, match="pass --attention-dim 128"):
        ExportOptions(mil_weights=trained[1], attention_dim=64)


def test_report_of_another_run_is_refused(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    from histohelper.model_export.export import ExportOptions

    other = tmp_path / "report.json"
    other.write_text(json.dumps({"cohort_sha256": "ff" * 32}))
    with pytest.raises(InvalidOptionsError, match="another training run"):
        ExportOptions(mil_weights=trained[1], mil_report=other)


# --- runtime --------------------------------------------------------------------------


def _bag(n: int = 40) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 512)).astype(np.float32)


def test_torchscript_aggregate_mc_equals_the_eager_head(
    mc_runtime, trained: tuple[Path, Path]
) -> None:
    from histohelper.model_export.modules import GatedAttentionMIL

    head = GatedAttentionMIL(512, 128, len(CLASSES), DROPOUT)
    head.load_state_dict(torch.load(trained[1], weights_only=True)["state_dict"])
    head.eval()  # forward_mc turns dropout on by itself
    bag = _bag()
    out = mc_runtime.aggregate_mc(bag, 8, 5)
    with torch.no_grad():
        probs = head.forward_mc(torch.from_numpy(bag), 8, 5).double().numpy()
    np.testing.assert_allclose(out.mean, probs.mean(0), atol=1e-5)
    np.testing.assert_allclose(out.std, probs.std(0), atol=1e-5)
    assert out.passes == 8 and out.std.min() > 0
    ent = -np.sum(probs.mean(0) * np.log(probs.mean(0)))
    assert out.entropy_nats == pytest.approx(ent, abs=1e-5)
    again = mc_runtime.aggregate_mc(bag, 8, 5)
    assert np.array_equal(again.mean, out.mean) and np.array_equal(again.std, out.std)
    # the deterministic pass is untouched by MC calls
    det = mc_runtime.aggregate(bag)
    with torch.no_grad():
        logits, _ = head(torch.from_numpy(bag))
    np.testing.assert_allclose(det.logits, logits.numpy(), atol=1e-5)


def test_mc_runs_in_seeded_chunks_and_stops_between_them(
    mc_runtime, trained: tuple[Path, Path]
) -> None:
    """40 passes = chunks of 16, 16, 8 with seeds 5, 5 + 7919, 5 + 2 * 7919; a set
    ``stop`` ends the run before the next chunk."""
    import threading

    from histohelper.errors import AnalysisCancelledError
    from histohelper.model_export.modules import GatedAttentionMIL

    head = GatedAttentionMIL(512, 128, len(CLASSES), DROPOUT)
    head.load_state_dict(torch.load(trained[1], weights_only=True)["state_dict"])
    bag = _bag()
    out = mc_runtime.aggregate_mc(bag, 40, 5)
    with torch.no_grad():
        h = torch.from_numpy(bag)
        chunks = [head.forward_mc(h, n, 5 + 7919 * c) for c, n in enumerate((16, 16, 8))]
    probs = torch.cat(chunks).double().numpy()
    assert out.passes == 40
    np.testing.assert_allclose(out.mean, probs.mean(0), atol=1e-5)
    np.testing.assert_allclose(out.std, probs.std(0), atol=1e-5)
    stop = threading.Event()
    stop.set()
    with pytest.raises(AnalysisCancelledError):
        mc_runtime.aggregate_mc(bag, 40, 5, stop=stop)


def test_numpy_head_mc_is_seeded(trained: tuple[Path, Path]) -> None:
    from histohelper.server.runtime.onnx import NumpyGatedAttention

    sd = torch.load(trained[1], weights_only=True)["state_dict"]
    mil = NumpyGatedAttention({k: v.numpy() for k, v in sd.items()})
    bag = _bag()
    a = mil.mc_probabilities(bag, 16, 5, DROPOUT)
    b = mil.mc_probabilities(bag, 16, 5, DROPOUT)
    assert a.shape == (16, 2) and np.array_equal(a, b)
    assert a.std(0).min() > 0
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)


def test_onnx_runtime_aggregate_mc(trained: tuple[Path, Path], served_runtime) -> None:
    """The ONNX/OpenVINO runtimes aggregate with the numpy head: seeded, and refused
    for a head without dropout (the patch session plays no part here)."""
    from histohelper.server.runtime.manifest import read_manifest
    from histohelper.server.runtime.onnx import NumpyGatedAttention, OnnxModel

    sd = torch.load(trained[1], weights_only=True)["state_dict"]
    mil = NumpyGatedAttention({k: v.numpy() for k, v in sd.items()})
    model = OnnxModel(None, mil, read_manifest(trained[0]))
    a, b = model.aggregate_mc(_bag(), 8, 2), model.aggregate_mc(_bag(), 8, 2)
    assert a.passes == 8 and np.array_equal(a.mean, b.mean) and a.std.min() > 0
    assert a.mean.dtype == a.std.dtype == np.float32
    plain = OnnxModel(None, mil, served_runtime.manifest)
    with pytest.raises(InvalidOptionsError, match="no dropout"):
        plain.aggregate_mc(_bag(), 8, 2)


@pytest.mark.parametrize("passes", [-1, 257], ids=["negative", "over-cap"])
def test_passes_out_of_range_refused(mc_runtime, passes: int) -> None:
    with pytest.raises(InvalidOptionsError, match="mc_dropout_passes"):
        mc_runtime.aggregate_mc(_bag(), passes, 0)


def test_no_dropout_model_refuses_mc(served_runtime) -> None:
    assert served_runtime.manifest.mil_dropout == 0.0
    with pytest.raises(InvalidOptionsError, match="no dropout"):
        served_runtime.aggregate_mc(_bag(), 4, 0)


# --- real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mc_server(trained: tuple[Path, Path], mc_runtime, slides_dir: Path):
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    config = ServerConfig(
        model_path=trained[0], slide_root=slides_dir, port=0, precision="fp32", grace_s=2.0
    )  # type: ignore[call-arg]
    running = start_server(config, runtime=mc_runtime)
    yield running
    running.stop(grace=0, drain=0)


def _completed(target: str, **options: object) -> pb.AnalysisCompleted:
    stub = pb_grpc.SlideAnalysisServiceStub(grpc.insecure_channel(target))
    request = pb.AnalyzeSlideRequest(slide_path=CMU, options=pb.AnalysisOptions(**options))
    events = list(stub.AnalyzeSlide(request, timeout=300))
    assert events[-1].WhichOneof("event") == "completed"
    return events[-1].completed


def test_analyze_with_mc_dropout(mc_server) -> None:
    first = _completed(mc_server.target, mc_dropout_passes=8).prediction
    second = _completed(mc_server.target, mc_dropout_passes=8).prediction
    plain = _completed(mc_server.target).prediction
    assert first.mc_dropout_passes == 8
    assert len(first.mc_mean_probabilities) == len(first.mc_std_probabilities) == 2
    assert sum(first.mc_mean_probabilities) == pytest.approx(1.0, abs=1e-5)
    assert min(first.mc_std_probabilities) > 0
    assert 0 < first.predictive_entropy_nats <= np.log(2) + 1e-6
    assert first == second  # reproducible: the masks are seeded
    # without the option nothing changes: same deterministic pass, no MC fields
    assert plain.mc_dropout_passes == 0 and not plain.mc_mean_probabilities
    assert not plain.mc_std_probabilities and plain.predictive_entropy_nats == 0
    assert list(plain.probabilities) == list(first.probabilities)
    assert plain.predicted_class == first.predicted_class


def test_client_exposes_uncertainty(mc_server, tmp_path: Path) -> None:
    from histohelper.client import AnalysisOptions, SlideClient
    from histohelper.client.cli import summary_line
    from histohelper.client.render import overlay

    with SlideClient(mc_server.target, tls=False) as client:
        result = client.analyze(CMU, AnalysisOptions(mc_dropout_passes=4))
        plain = client.analyze(CMU)
    u = result.slide_uncertainty
    assert u is not None and u.passes == 4 and len(u.mean) == len(u.std) == 2
    assert "MC dropout (4 passes)" in summary_line("s", result, tmp_path)
    assert plain.slide_uncertainty is None
    assert "MC dropout" not in summary_line("s", plain, tmp_path)
    assert not np.array_equal(overlay(result), overlay(plain))  # header lines drawn


@pytest.mark.parametrize("passes", [257, 1000], ids=["257", "1000"])
def test_server_refuses_too_many_passes(mc_server, passes: int) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _completed(mc_server.target, mc_dropout_passes=passes)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mc_dropout_passes" in (info.value.details() or "")


def test_server_without_dropout_refuses_mc(start_inprocess_server) -> None:
    running = start_inprocess_server()
    with pytest.raises(grpc.RpcError) as info:
        _completed(running.target, mc_dropout_passes=4)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no dropout" in (info.value.details() or "")
