"""Console output over a real server: untrained parts named at start, by ``info`` and in
the result line; one line per QC warning after analyze's result line; a broken stdout
pipe ends a command quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histohelper.cli import main

TINY = "real/tiny-16px.svs"  # 16 x 16 px: smaller than one patch (a QC warning)


def test_server_log_warns_which_parts_are_untrained(analysis_server) -> None:
    """The session's artifact is the seeded untrained export (patch and MIL parts)."""
    records = [json.loads(ln) for ln in analysis_server.log_text().splitlines() if ln[:1] == "{"]
    warned = [r for r in records if r.get("level") == "WARNING" and "untrained" in r["message"]]
    assert len(warned) == 1, records
    assert "patch classifier, MIL slide head" in warned[0]["message"]
    serving = next(r for r in records if r["message"] == "serving")
    assert serving["untrained_parts"] == ["patch", "mil"]


def test_info_names_untrained_parts(analysis_server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--server", analysis_server.target]) == 0
    text = capsys.readouterr().out
    assert (
        "WARNING: untrained (seeded random initialisation): patch classifier, MIL slide head; "
        "its predictions mean nothing"
    ) in text
    assert main(["info", "--server", analysis_server.target, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["untrained_parts"] == ["patch", "mil"]
    assert doc["manifest"]["untrained_parts"] == ["patch", "mil"]


def test_analyze_prints_one_line_per_qc_warning(
    analysis_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny"
    rc = main(["analyze", TINY, "--server", analysis_server.target, "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    warnings = summary["warnings"]
    assert any("smaller than one patch" in w for w in warnings), warnings
    assert lines[0].startswith(f"{TINY}: ") and "[UNTRAINED: patch classifier" in lines[0]
    assert lines[1:] == [f"  QC warning: {w}" for w in warnings]
    assert summary["model"]["untrained_parts"] == ["patch", "mil"]


def _run_into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the console script with stdout a pipe whose reader has already gone (what
    ``| head`` leaves once it has its lines): the first write gets EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "histohelper.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["info", "--server", "{target}"], id="info-guarded-command"),
        pytest.param(["export", "--inspect", "{model}"], id="export-inspect-unguarded"),
    ],
)
def test_broken_pipe_ends_quietly(analysis_server, args: list[str]) -> None:
    fill = {"target": analysis_server.target, "model": analysis_server.model}
    res = _run_into_closed_pipe([a.format(**fill) for a in args])
    assert res.returncode == 1
    assert res.stderr == ""  # no "error: Broken pipe", no traceback, no flush warning
