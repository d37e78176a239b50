"""The exported artifact: manifest, shape-generic parity with eager, weights, failures."""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from histohelper.errors import InvalidOptionsError, ParityError, WeightsError
from histohelper.model_export import cli, export
from histohelper.model_export.export import UntrainedModelWarning, export_model
from histohelper.model_export.modules import HistoHelperModel
from histohelper.model_export.weights import sha256_file, unwrap_state_dict
from histohelper.server.runtime import load_runtime, read_manifest


def _quiet_export(out: Path, **kwargs: object):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        return export_model(out, **{"variants": (), "check_served": False, **kwargs})


@pytest.fixture(scope="module")
def scripted(model_artifact: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(model_artifact)).eval()


@pytest.fixture(scope="module")
def eager(scripted: torch.jit.ScriptModule) -> HistoHelperModel:
    model = HistoHelperModel().eval()
    model.load_state_dict(scripted.state_dict())
    model.patch.to(memory_format=torch.channels_last)  # as export_model does
    return model


def test_manifest_of_default_export(model_artifact: Path) -> None:
    m = read_manifest(model_artifact)
    assert m.patch_classes == ("benign", "malignant") == m.slide_classes
    assert (m.patch_size_px, m.target_mpp, m.embedding_dim, m.cam_size) == (224, 0.5, 512, 7)
    assert m.untrained and m.untrained_parts == ("patch", "mil") and m.weights == ()
    assert m.seed == 0
    assert m.torch_version == torch.__version__
    assert m.torchvision_version == torchvision.__version__
    assert m.input.layout == "NHWC" and m.input.dtype == "uint8" and m.input.normalisation_inside
    assert m.normalisation.mean == (0.485, 0.456, 0.406)
    for key in ("torchscript_patches", "served_fp32_patches", "torchscript_aggregate"):
        assert m.parity[key].passed and m.parity[key].max_abs_prob_diff <= 1e-5
    assert [v.precision for v in m.precisions] == ["fp32", "bf16"]
    assert m.calibration.startswith("synthetic")


def test_seeded_init_is_deterministic(scripted: torch.jit.ScriptModule) -> None:
    torch.manual_seed(0)
    fresh = HistoHelperModel().state_dict()
    for k, v in scripted.state_dict().items():
        assert torch.equal(v, fresh[k]), k


@pytest.mark.parametrize("n", [1, 7, 513, 50_000], ids=lambda n: f"bag{n}")
def test_artifact_matches_eager_for_bag_sizes(
    scripted: torch.jit.ScriptModule, eager: HistoHelperModel, model_artifact: Path, n: int
) -> None:
    h = torch.randn(n, 512, generator=torch.Generator().manual_seed(n)).abs()
    with torch.inference_mode():
        ref_logits, ref_att = eager.aggregate(h)
        logits, att = scripted.aggregate(h)
    assert att.shape == (n,)
    assert float((att - ref_att).abs().max()) <= 1e-6
    p, ref_p = torch.softmax(logits, 0), torch.softmax(ref_logits, 0)
    assert float((p - ref_p).abs().max()) <= 1e-5
    assert abs(float(att.double().sum()) - 1) < 1e-5


@pytest.mark.parametrize("b", [1, 63, 64], ids=lambda b: f"batch{b}")
def test_artifact_matches_eager_for_batch_sizes(
    scripted: torch.jit.ScriptModule, eager: HistoHelperModel, b: int
) -> None:
    x = torch.randint(
        0, 256, (b, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(b)
    )
    with torch.inference_mode():
        ref = eager.predict_patches_uint8(x, True)
        out = scripted.predict_patches_uint8(x, True)
    assert out[0].shape == (b, 2) and out[1].shape == (b, 512) and out[2].shape == (b, 2, 7, 7)
    dp = (torch.softmax(out[0], 1) - torch.softmax(ref[0], 1)).abs().max()
    assert float(dp) <= 1e-5
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], ref[2], atol=1e-4, rtol=1e-5)


def test_other_patch_size_is_not_baked(
    scripted: torch.jit.ScriptModule, eager: HistoHelperModel
) -> None:
    """Scripting, not tracing: even the image size is free (CAMs follow it)."""
    x = torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8)
    with torch.inference_mode():
        out = scripted.predict_patches_uint8(x, True)
        ref = eager.predict_patches_uint8(x, True)
    assert out[2].shape == (2, 2, 3, 3)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)


def test_unwrap_checkpoint_wrappers() -> None:
    sd = {"conv1.weight": torch.zeros(1), "fc.bias": torch.ones(2)}
    for wrapped in (
        sd,
        {"state_dict": sd},
        {"model": sd, "epoch": 3},
        {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}},
        {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    ):
        assert unwrap_state_dict(wrapped).keys() == sd.keys()
    with pytest.raises(WeightsError, match="no state_dict"):
        unwrap_state_dict({"epoch": 3, "optimizer": "adam"})


def test_export_with_weights(tmp_path: Path) -> None:
    """A plain torchvision resnet18 state_dict with a 2-class fc loads as is."""
    torch.manual_seed(123)
    resnet = torchvision.models.resnet18(num_classes=2).eval()
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for mod in resnet.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    wpath = tmp_path / "histohelper_production.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, wpath)
    mil = HistoHelperModel(2, 3).mil
    mpath = tmp_path / "mil.pth"
    torch.save(mil.state_dict(), mpath)
    out = tmp_path / "trained.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedModelWarning)
        m = export_model(
            out,
            weights=wpath,
            mil_weights=mpath,
            slide_classes=("pulmonary", "cerebral", "other"),
            variants=(),
            check_served=False,
        )
    assert not m.untrained and m.untrained_parts == () and m.seed is None
    assert m.slide_classes == ("pulmonary", "cerebral", "other")
    assert {(w.role, w.file_name, w.sha256) for w in m.weights} == {
        ("patch", wpath.name, sha256_file(wpath)),
        ("mil", mpath.name, sha256_file(mpath)),
    }
    rt = load_runtime(out, device="cpu", precision="fp32")
    x = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    xf = torchvision.transforms.functional.normalize(
        xf, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    with torch.no_grad():
        ref = torch.softmax(resnet(xf), 1).numpy()
    assert np.abs(rt.predict_patches(x).probabilities - ref).max() <= 1e-5
    assert rt.aggregate(rt.predict_patches(x).embeddings).logits.shape == (3,)


def _dir_listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_wrong_fc_shape_fails_readably_and_writes_nothing(tmp_path: Path) -> None:
    wpath = tmp_path / "imagenet_fc.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), wpath)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(WeightsError) as info:
        _quiet_export(out_dir / "model.pt", weights=wpath)
    msg = str(info.value)
    assert "mis-shaped (2): fc.weight (checkpoint [1000, 512], model [2, 512])" in msg
    assert "fc.bias (checkpoint [1000], model [2])" in msg
    assert "--patch-classes" in msg
    assert _dir_listing(out_dir) == []


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    sd = torchvision.models.resnet18(num_classes=2).state_dict()
    sd.pop("layer4.1.bn2.running_var")
    sd["head.extra.weight"] = torch.zeros(3)
    wpath = tmp_path / "bad.pth"
    torch.save({"model": sd}, wpath)
    with pytest.raises(WeightsError) as info:
        _quiet_export(tmp_path / "model.pt", weights=wpath)
    assert "missing keys (1): layer4.1.bn2.running_var" in str(info.value)
    assert "unexpected keys (1): head.extra.weight" in str(info.value)
    assert _dir_listing(tmp_path) == ["bad.pth"]


def test_failed_parity_gate_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "FP32_PROB_TOL", -1.0)
    with pytest.raises(ParityError, match="differs from eager fp32"):
        _quiet_export(tmp_path / "model.pt")
    assert _dir_listing(tmp_path) == []


def test_untrained_export_warns(tmp_path: Path) -> None:
    with pytest.warns(UntrainedModelWarning, match="UNTRAINED"):
        export_model(tmp_path / "m.pt", variants=(), check_served=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histohelper")
    cli.add_subcommands(parser.add_subparsers(dest="command"))
    return parser


def _run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_inspect_prints_manifest(
    model_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run_cli(["export", "--inspect", str(model_artifact)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(read_manifest(model_artifact).to_json())
    for key in (
        "format_version",
        "model_name",
        "model_version",
        "patch_classes",
        "slide_classes",
        "patch_size_px",
        "target_mpp",
        "normalisation",
        "input",
        "precisions",
        "weights",
        "untrained",
        "torch_version",
        "torchvision_version",
        "exported_at",
        "parity",
    ):
        assert key in printed


def test_cli_export_untrained_warns_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.pt"
    assert (
        _run_cli(["export", str(out), "--variants", "--slide-classes", "pulmonary,cerebral"]) == 0
    )
    err = capsys.readouterr().err
    assert "warning: exporting an UNTRAINED model" in err
    assert read_manifest(out).slide_classes == ("pulmonary", "cerebral")
    # Progress: one numbered line per stage as it starts, with the time since the start.
    stages = [ln for ln in err.splitlines() if ln.startswith("export: [")]
    assert [ln.split()[1] for ln in stages] == [f"[{i}/6]" for i in range(1, 7)], err
    assert "precision variants gated against fp32: none" in stages[4]
    assert all(re.search(r"\(at \d+\.\d s\)$", ln) for ln in stages), stages
    assert _run_cli(["export", str(tmp_path / "q.pt"), "--variants", "--quiet"]) == 0
    assert "export: [" not in capsys.readouterr().err


def test_cli_wrong_fc_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wpath = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), wpath)
    assert _run_cli(["export", str(tmp_path / "m.pt"), "--weights", str(wpath)]) == 1
    err = capsys.readouterr().err
    assert "error: weights do not fit the patch network" in err and "no artifact was written" in err
    assert not (tmp_path / "m.pt").exists()


def test_cli_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["export", "--help"])
    out = capsys.readouterr().out
    for action in _parser()._subparsers._group_actions[0].choices["export"]._actions:  # type: ignore[union-attr]
        assert action.help, action.dest
    for flag in (
        "--weights",
        "--mil-weights",
        "--inspect",
        "--calibration-slide",
        "--onnx",
        "--variants",
    ):
        assert flag in out


def test_export_options_object_and_keywords_agree(tmp_path: Path) -> None:
    """``export_model`` takes an :class:`ExportOptions`, keywords overriding its fields;
    an unknown keyword or an invalid option fails before anything is written."""
    from histohelper.model_export.export import ExportOptions

    opts = ExportOptions(patch_size_px=32, variants=(), check_served=False)
    with pytest.warns(UntrainedModelWarning):
        by_object = export_model(tmp_path / "a.pt", opts)
        by_keywords = export_model(
            tmp_path / "b.pt", patch_size_px=32, variants=(), check_served=False
        )
        overridden = export_model(tmp_path / "c.pt", opts, model_version="9.9")
    assert by_object.model_copy(update={"exported_at": ""}) == by_keywords.model_copy(
        update={"exported_at": ""}
    )
    assert overridden.model_version == "9.9" and overridden.patch_size_px == 32
    with pytest.raises(TypeError):
        export_model(tmp_path / "d.pt", opts, patch_size=32)
    with pytest.raises(InvalidOptionsError, match="multiple of 32"):
        export_model(tmp_path / "e.pt", opts, patch_size_px=48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"]
