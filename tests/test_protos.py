"""The committed generated code equals what scripts/gen_protos.py makes from proto/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "histohelper" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted((tmp_path / "histohelper" / "v1").glob("*_pb2*.py*"))
    assert fresh, "generator produced nothing"
    committed = sorted(COMMITTED.glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in committed]
    for new in fresh:
        old = COMMITTED / new.name
        assert new.read_text() == old.read_text(), f"{new.name} is stale: run `make protos`"


def _floor(pattern: str, text: str) -> tuple[int, ...]:
    match = re.search(pattern, text)
    assert match, pattern
    return tuple(int(x) for x in match.groups())


def test_pyproject_floors_match_generated_code() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    grpc_src = (COMMITTED / "slide_analysis_pb2_grpc.py").read_text()
    pb2_src = (COMMITTED / "slide_analysis_pb2.py").read_text()
    grpc_generated = _floor(r"GRPC_GENERATED_VERSION = '(\d+)\.(\d+)\.(\d+)'", grpc_src)
    pb_generated = _floor(r"# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", pb2_src)
    assert _floor(r'"grpcio>=(\d+)\.(\d+)\.(\d+)"', pyproject) == grpc_generated
    assert _floor(r'"protobuf>=(\d+)\.(\d+)\.(\d+)', pyproject) == pb_generated


@pytest.mark.parametrize(
    "name", ["AnalyzeSlide", "GetModelInfo", "ClassifyPatches"], ids=lambda n: n
)
def test_service_has_rpc(name: str) -> None:
    from histohelper.v1 import slide_analysis_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["SlideAnalysisService"]
    assert name in service.methods_by_name
