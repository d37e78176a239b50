"""PACS credentials files are read again when they change (tester B finding 5), over a
real loopback server and the real Orthanc with basic authentication.

Before: ``NAME.basic`` / ``NAME.token`` were read once at start-up, so a fixed password
or a rotated token (an OAuth sidecar, a Kubernetes secret) kept failing until a
restart. Now every HTTP request checks the files (stat) and reads them again when they
changed; a file that became unusable fails the call with a clear error naming only
the entry and the file, and the server keeps serving.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from orthanc_support import Orthanc, stow

from histohelper.client import AnalysisOptions, SlideClient
from histohelper.errors import PacsPermissionDeniedError

WRONG = "histo:wrong-password-4242"
#: A coarse resolution: a handful of patches, a few frames.
OPTIONS = AnalysisOptions(target_mpp=4.0, min_tissue_fraction=0.0)


@pytest.fixture(scope="module")
def locked_uri(orthanc_auth: Orthanc, dicomweb_dicom_dir: Path) -> str:
    """The converted real slide stored in the basic-auth Orthanc, as a dicomweb:// URI
    of the entry ``locked``."""
    import pydicom

    files = sorted(dicomweb_dicom_dir.glob("*.dcm"))
    stow(orthanc_auth, files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return f"dicomweb://locked/{first.StudyInstanceUID}/{first.SeriesInstanceUID}"


def _write(path: Path, text: str | bytes) -> None:
    """Replace ``path`` atomically (as a secret volume or a sidecar does)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def test_fixed_basic_credentials_work_without_a_restart(
    start_inprocess_server,
    orthanc_auth: Orthanc,
    locked_uri: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    basic = secrets_dir / "locked.basic"
    basic.write_text(WRONG)
    right = f"{orthanc_auth.username}:{orthanc_auth.password}"
    server = start_inprocess_server(
        dicomweb=f"locked={orthanc_auth.dicomweb_url}", dicomweb_secrets_dir=secrets_dir
    )
    with SlideClient(server.target, timeout=300) as client:
        with pytest.raises(PacsPermissionDeniedError) as denied:
            client.analyze(locked_uri, OPTIONS)
        assert "'locked'" in denied.value.message and "HTTP 401" in denied.value.message

        _write(basic, right)  # the operator fixes the file: no restart, no SIGHUP
        first = client.analyze(locked_uri, OPTIONS)
        assert first.patch_count > 0

        _write(basic, "no-colon-here")  # malformed: a clear error, the server serves on
        with pytest.raises(PacsPermissionDeniedError) as bad:
            client.analyze(locked_uri, OPTIONS)
        message = bad.value.message
        assert "'locked'" in message and "locked.basic" in message
        assert "user:password" in message and "no-colon-here" not in message
        assert str(secrets_dir) not in message
        _write(basic, b"\xff\xfe not utf-8")  # unreadable as text
        with pytest.raises(PacsPermissionDeniedError, match=r"cannot read locked\.basic"):
            client.analyze(locked_uri, OPTIONS)
        assert client.get_model_info().model.name  # still serving

        _write(basic, WRONG)  # a wrong password again: the PACS refuses it
        with pytest.raises(PacsPermissionDeniedError, match="HTTP 401"):
            client.analyze(locked_uri, OPTIONS)  # (the pooled series is not reused)
        _write(basic, right)
        again = client.analyze(locked_uri, OPTIONS)
    assert again.patch_count == first.patch_count
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "changed on disk" in caplog.text and "locked.basic" in caplog.text
    for secret in (orthanc_auth.password or "", WRONG, "no-colon-here"):
        assert secret and secret not in logged
