"""histohelper analyze of a local DICOM file named by its SOP Instance UID (as
wsidicomizer names them): the console's summary line shows the path with the UID
replaced by ``dicom-<12 hex>``, and no UID reaches stdout or stderr (tester A finding
10(c)). Real in-process server over a copy of the shared 16 x 16 px DICOM series."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from server_fixtures import inprocess_server

from histohelper.cli import main
from histohelper.client.dicomweb import display_name


def test_summary_line_of_a_local_dicom_file_shows_no_uid(
    model_artifact: Path,
    served_runtime,
    slides_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "root"
    (root / "case").mkdir(parents=True)
    uids = []
    for source in sorted((slides_dir / "dicom-boxes").glob("*.dcm")):
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        shutil.copyfile(source, root / "case" / f"{uid}.dcm")
        uids.append(uid)
    named = f"case/{uids[0]}.dcm"
    server = inprocess_server(model_artifact, served_runtime, root)
    try:
        target = f"127.0.0.1:{server.port}"
        rc = main(["analyze", named, "--server", target, "--out", str(tmp_path / "o"), "-q"])
    finally:
        server.stop(grace=0, drain=0)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    first = captured.out.splitlines()[0]
    assert first.startswith(f"{display_name(named)}: ") and first.startswith("case/dicom-")
    for uid in uids:
        assert uid not in captured.out and uid not in captured.err
