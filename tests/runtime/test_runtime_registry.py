"""The backend registry, the one home of the CPU checks, and the manifest's int8 gates
read from both manifest layouts."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from histohelper.errors import ModelArtifactError
from histohelper.server import runtime as rt_pkg
from histohelper.server.runtime import (
    MANIFEST_NAME,
    BackendSpec,
    ModelRuntime,
    backend_names,
    choose_backend,
    get_backend,
    load_runtime,
    parse_manifest,
    read_manifest,
    register_backend,
)
from histohelper.server.runtime import registry as registry_mod
from histohelper.server.runtime.cpu import accelerator_possible, cpu_has_vnni
from histohelper.server.runtime.manifest import FORMAT_VERSION, ParityFigures

FORMAT1 = Path(__file__).parent / "data" / "manifest_v1_int8.json"


def test_builtin_backends_in_auto_order() -> None:
    assert backend_names()[:3] == ("openvino", "onnx", "torchscript")
    assert get_backend("onnx").int8_gate == "onnxruntime"
    assert get_backend("openvino").int8_gate == "openvino"
    assert get_backend("torchscript").int8_gate is None


def test_unknown_backend_is_refused_with_the_known_ones(model_artifact: Path) -> None:
    """Before the registry an unknown name silently loaded TorchScript."""
    with pytest.raises(ModelArtifactError, match="known: auto, openvino, onnx, torchscript"):
        load_runtime(model_artifact, device="cpu", backend="tensorrt")


def test_auto_name_is_reserved() -> None:
    with pytest.raises(ValueError, match="auto"):
        register_backend(BackendSpec("auto", ".onnx:load_onnx", lambda: True))


def _with_manifest(src: Path, dest: Path, manifest_json: str) -> Path:
    """A copy of the artifact ``src`` at ``dest`` whose manifest is ``manifest_json``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(f"/extra/{MANIFEST_NAME}"):
                data = manifest_json.encode()
            zout.writestr(info, data)
    return dest


def _gate(passed: bool) -> ParityFigures:
    return ParityFigures(
        reference="eager fp32",
        n_samples=8,
        max_abs_prob_diff=0.001 if passed else 0.5,
        max_abs_logit_diff=0.01,
        argmax_agreement=1.0,
        tolerance=0.02,
        passed=passed,
    )


def test_a_registered_backend_is_loaded_and_chosen_by_its_own_gate(
    model_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new backend is one registration: ``load_runtime`` loads it by name, and
    ``auto`` picks it for int8 from the manifest's gate of its own name."""
    calls: list[dict[str, object]] = []

    def load_fake(path: object, **kwargs: object) -> ModelRuntime:
        calls.append(kwargs)
        runtime: ModelRuntime = load_runtime(path, device="cpu", precision="fp32")  # type: ignore[arg-type]
        return runtime

    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    register_backend(BackendSpec("fake", load_fake, lambda: True, int8_gate="fake-engine"))
    assert "fake" in backend_names()
    rt = load_runtime(model_artifact, backend="fake", precision="int8", num_threads=1)
    assert isinstance(rt, ModelRuntime)
    assert calls == [{"device": "auto", "precision": "int8", "num_threads": 1}]

    m = read_manifest(model_artifact)
    onnx = parse_manifest(FORMAT1.read_text()).onnx
    assert onnx is not None
    gated = onnx.model_copy(update={"int8_gates": {"fake-engine": _gate(True)}})
    copy = _with_manifest(
        model_artifact, tmp_path / "m.pt", m.model_copy(update={"onnx": gated}).to_json()
    )
    if cpu_has_vnni() and not accelerator_possible():
        assert choose_backend(copy, "auto", "auto") == "fake"
    assert choose_backend(copy, "cpu", "fp32") == "torchscript"
    failed = onnx.model_copy(update={"int8_gates": {"fake-engine": _gate(False)}})
    copy = _with_manifest(
        model_artifact, tmp_path / "f.pt", m.model_copy(update={"onnx": failed}).to_json()
    )
    assert choose_backend(copy, "cpu", "auto") == "torchscript"


def test_format1_manifest_reads_into_one_mapping_of_gates() -> None:
    """A manifest as exported before the mapping (one field per engine, format 1)
    loads, with the same figures under the engines' names."""
    raw = json.loads(FORMAT1.read_text())
    assert raw["format_version"] == 1 and "int8_gates" not in raw["onnx"]
    m = parse_manifest(FORMAT1.read_text())
    assert m.format_version == FORMAT_VERSION
    assert m.onnx is not None
    gates = m.onnx.int8_gates
    assert set(gates) == {"onnxruntime", "openvino", "openvino-bf16"}
    for engine, key in (
        ("onnxruntime", "int8_parity"),
        ("openvino", "int8_parity_openvino"),
        ("openvino-bf16", "int8_parity_openvino_bf16"),
    ):
        assert gates[engine] == ParityFigures.model_validate(raw["onnx"][key])
    assert m.onnx.int8_passed() and m.onnx.int8_passed("onnxruntime")
    assert m.onnx.int8_passed("openvino")
    assert not m.onnx.int8_passed("openvino-bf16")  # its gate failed in the file
    assert not m.onnx.int8_passed("never-gated")
    # Written back in the current layout, it reads the same.
    again = parse_manifest(m.to_json())
    assert again == m
    assert "int8_parity_openvino" not in json.loads(m.to_json())["onnx"]


def test_format1_manifest_with_engines_missing() -> None:
    """An export made without OpenVINO had null OpenVINO fields: no gate, no mapping key."""
    raw = json.loads(FORMAT1.read_text())
    raw["onnx"]["int8_parity_openvino"] = None
    raw["onnx"]["int8_parity_openvino_bf16"] = None
    m = parse_manifest(json.dumps(raw))
    assert m.onnx is not None and set(m.onnx.int8_gates) == {"onnxruntime"}
    assert not m.onnx.int8_passed("openvino")


def test_cpu_checks_have_one_home() -> None:
    """The feature checks live in ``runtime.cpu`` only; the backends do not define
    their own copies."""
    from histohelper.server.runtime import cpu, onnx, openvino

    for module in (onnx, openvino, rt_pkg):
        for name in ("_cpu_flags", "cpu_has_vnni", "cpu_has_bf16", "accelerator_possible"):
            value = getattr(module, name, None)
            assert value is None or value is getattr(cpu, name), (module.__name__, name)


def test_registry_imports_no_engine() -> None:
    """Asking which backends exist imports none of torch, onnxruntime or openvino."""
    code = (
        "import sys\n"
        "from histohelper.server.runtime import backend_names, get_backend\n"
        "[get_backend(n).available() for n in backend_names()]\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'openvino') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
