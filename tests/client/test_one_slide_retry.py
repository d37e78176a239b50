"""A one-slide ``histohelper analyze`` retries as a cohort run does (same code,
:func:`histohelper.client.cohort.analyze_many`), over a real in-process server whose
only PACS is a closed loopback port: PACS_UNAVAILABLE (``retry_after_s`` 10) is
retried after at least the hint, each retry one stderr line naming no slide, and
``--retries`` bounds the calls; the SDK's ``SlideClient.analyze`` stays one call."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from metrics_support import free_port

from histohelper.client.cli import main
from histohelper.client.sync import SlideClient
from histohelper.errors import PacsUnavailableError

STUDY, SERIES = "1.2.826.0.1.3680043", "1.2.826.0.1.3680043.7"
DOWN_URI = f"dicomweb://down/{STUDY}/{SERIES}"


@pytest.fixture
def server(start_inprocess_server, tmp_path: Path):
    """A server whose DICOMweb server ``down`` is a closed port, with an audit log."""
    return start_inprocess_server(
        dicomweb=f"down=http://127.0.0.1:{free_port()}/dicom-web",
        audit_log=tmp_path / "audit.jsonl",
    )


def _analyze_records(server) -> list[dict]:
    """The server's AnalyzeSlide audit records (one per call that reached it)."""
    lines = server.config.audit_log.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["rpc"] == "AnalyzeSlide"]


def _run(server, tmp_path: Path, *extra: str) -> int:
    argv = ["analyze", DOWN_URI, "--server", server.target, "--out", str(tmp_path / "out")]
    return main([*argv, "-q", *extra])


def test_one_slide_retries_pacs_unavailable_after_the_hint(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.monotonic()
    rc = _run(server, tmp_path, "--retries", "2", "--request-id", "one-slide-7")
    waited = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err == [
        "retrying (attempt 2/2) after 10.0 s: PACS_UNAVAILABLE (request id one-slide-7)",
        err[1],
    ]
    assert err[1].startswith("histohelper analyze: error: ")
    assert err[1].endswith("[PACS_UNAVAILABLE] (request id one-slide-7)")
    assert not any(uid in line for line in err for uid in (STUDY, SERIES))
    records = _analyze_records(server)
    assert [(r["request_id"], r["reason"]) for r in records] == [
        ("one-slide-7", "PACS_UNAVAILABLE")
    ] * 2  # two attempts, each one call: no silent gRPC retries
    assert waited >= 10.0  # the retry waited for the server's retry_after_s


def test_one_attempt_fails_once_with_the_hint(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = _run(server, tmp_path, "--retries", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "[PACS_UNAVAILABLE]" in err[0]
    assert len(_analyze_records(server)) == 1
    with SlideClient(server.target) as client, pytest.raises(PacsUnavailableError) as info:
        client.analyze(DOWN_URI)  # the SDK's analyze is one call, never retried
    assert info.value.metadata["retry_after_s"] == "10"
    assert len(_analyze_records(server)) == 2
