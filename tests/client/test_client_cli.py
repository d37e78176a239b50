"""`histohelper analyze` / `histohelper info` against a scripted real gRPC server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import pytest
from client_fakes import ScriptedServer, StreamSpec, build_stream, status_for

from histohelper.client.cli import main
from histohelper.errors import (
    InvalidOptionsError,
    ServerBusyError,
    SlideNotFoundError,
    SlidePathDeniedError,
)

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_analyze_writes_files_and_one_summary_line(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.script.messages, exp = build_stream(StreamSpec())
    out = tmp_path / "out"
    rc = main(["analyze", "real/x.svs", "--server", scripted.target, "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("overlay.png", "heatmap.npz", "tiles.geojson", "summary.json", "patches.csv"):
        assert (out / name).is_file(), name
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    assert "predicted positive" in lines[0] and f"{len(exp.patch_index)} patches" in lines[0]
    assert "UNTRAINED" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patch_count"] == len(exp.patch_index)


def test_analyze_options_and_overlay_class(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.script.messages, _ = build_stream(StreamSpec())
    argv = ["analyze", "x.svs", "--server", scripted.target, "--out", str(tmp_path), "-q"]
    argv += ["--mpp", "1.0", "--stride", "112", "--edge-mode", "drop", "--class", "stroma"]
    argv += ["--no-attention", "--min-tissue", "0.25"]
    assert main(argv) == 0, capsys.readouterr().err
    opts = scripted.script.requests[0].options
    assert opts.target_resolution.mpp == 1.0 and opts.stride_px == 112
    assert not opts.return_attention and opts.min_tissue_fraction == pytest.approx(0.25)
    assert cv2.imread(str(tmp_path / "overlay.png")) is not None


def test_server_from_environment(
    scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HISTOHELPER_SERVER", scripted.target)
    monkeypatch.setenv("HISTOHELPER_TOKEN", "tok")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fake-model 0.0.1" in out and "UNTRAINED".lower() in out.lower()
    assert '"format": "histohelper-model"' in out
    assert scripted.script.received_metadata[0]["authorization"] == "Bearer tok"


def test_info_json(scripted: ScriptedServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--server", scripted.target, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["manifest"]["classes"] == ["tumor", "stroma", "other"]
    assert doc["model"]["untrained"] is True


@pytest.mark.parametrize(
    "error",
    [
        SlideNotFoundError("the slide does not exist"),
        SlidePathDeniedError("the slide is outside the slide root"),
        InvalidOptionsError("stride_px must be positive"),
        ServerBusyError("the server is at its limit of 2 analyses"),
    ],
    ids=lambda e: e.reason,
)
def test_server_errors_are_one_line(
    scripted: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
) -> None:
    scripted.script.abort_with = status_for(error)
    # One attempt: SERVER_BUSY is retried otherwise, a line per retry (test_one_slide_retry).
    argv = ["analyze", "x.svs", "--server", scripted.target, "--out", str(tmp_path), "-q"]
    rc = main([*argv, "--retries", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("histohelper analyze: error: ")
    assert str(error) in err and f"[{error.reason}]" in err and "req-err" in err


def test_missing_server_is_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HISTOHELPER_SERVER", raising=False)
    assert main(["info"]) == 2
    assert "no server" in capsys.readouterr().err


def _blocked_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` with torch, torchvision and OpenSlide unimportable."""
    prelude = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = ("torch", "torchvision", "openslide")
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
                return None
        sys.meta_path.insert(0, Blocker())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_client_works_without_torch_or_openslide(scripted: ScriptedServer, tmp_path: Path) -> None:
    scripted.script.messages, exp = build_stream(StreamSpec())
    argv = ["analyze", "x.svs", "--server", scripted.target, "--out", str(tmp_path), "-q"]
    code = f"""
        import histohelper.client
        assert "cv2" not in sys.modules, "package import pulled in cv2"
        from histohelper.client.cli import main
        rc = main({argv!r})
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        assert not any(m.startswith("histohelper.server.") and "runtime" in m for m in sys.modules)
        print("RC", rc)
    """
    proc = _blocked_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "RC 0" in proc.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["patch_count"] == len(
        exp.patch_index
    )
    # And the blocker really blocks.
    probe = _blocked_python("import torch")
    assert probe.returncode != 0 and "blocked" in probe.stderr


def test_unreachable_server_subprocess_no_traceback(tmp_path: Path) -> None:
    code = f"""
        from histohelper.client.cli import main
        sys.exit(main(["info", "--server", "127.0.0.1:{free_port()}", "--retries", "2"]))
    """
    proc = _blocked_python(code)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("histohelper info: error: server unavailable")


def test_no_tissue_is_success(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.script.messages, _ = build_stream(StreamSpec(no_tissue=True))
    rc = main(["analyze", "x.svs", "--server", scripted.target, "--out", str(tmp_path), "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "no tissue found" in out and "0 patches" in out
    assert json.loads((tmp_path / "summary.json").read_text())["prediction"] is None
    assert (tmp_path / "overlay.png").is_file()


def test_console_script_dispatcher_without_torch_or_openslide(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    scripted.script.messages, _ = build_stream(StreamSpec())
    argv = ["analyze", "x.svs", "--server", scripted.target, "--out", str(tmp_path), "-q"]
    proc = _blocked_python(f"from histohelper.cli import main\nsys.exit(main({argv!r}))")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "overlay.png").is_file()


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["export", "model.pt"], "export"),
        (["tile", "slide.svs", "--out", "x"], "server"),
    ],
    ids=["export", "tile"],
)
def test_command_missing_its_extra_says_which_to_install(
    tmp_path: Path, argv: list[str], extra: str
) -> None:
    code = f"from histohelper.cli import main\nsys.exit(main({argv!r}))"
    proc = _blocked_python(code)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"histohelper[{extra}]" in proc.stderr


def test_unknown_overlay_class_is_refused_before_the_analysis(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.script.messages, _ = build_stream(StreamSpec())
    argv = ["analyze", "x.svs", "--server", scripted.target, "--out", str(tmp_path), "-q"]
    assert main([*argv, "--class", "no-such-class"]) == 2
    assert "not a patch class" in capsys.readouterr().err
    assert scripted.script.requests == []  # no AnalyzeSlide was sent
