"""The PACS's credentials over the wire: a CA bundle against a real HTTPS PACS and a
bearer token against a real PACS that checks it, through a real gRPC server.

HTTPS: the test makes a CA and a server certificate (``histohelper certs`` code) and
serves the test Orthanc over HTTPS through stunnel (orthanc_support says why not
Orthanc's own TLS). ``REQUESTS_CA_BUNDLE`` points at the public CA bundle for the whole
module, as many container images set it: requests would let it override the session's
CA (psf/requests#4650), so the CA-bundle case fails if the server relied on
``session.verify`` alone.

Bearer token: Orthanc's Python plugin (Debian ``orthanc-python``) runs a request
filter that answers 403 unless ``Authorization: Bearer <token>`` is the right one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from orthanc_support import Orthanc, start_orthanc, stow
from server_fixtures import inprocess_server
from test_dicomweb_service import _analyze, insecure_stub, status_of

from histohelper.v1 import slide_analysis_pb2 as pb

#: The token the bearer PACS accepts, and the one the misconfigured entry sends.
TOKEN = "right-" + secrets.token_hex(16)
WRONG_TOKEN = "wrong-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The PACS's CA and certificate (+ key, one PEM for stunnel), and another CA."""
    from histohelper.server.certs import make_certificates

    root = tmp_path_factory.mktemp("pacs-pki")
    right = make_certificates(root / "right")
    other = make_certificates(root / "other")
    pem = root / "pacs.pem"
    pem.write_text(right.server_cert.read_text() + right.server_key.read_text())
    return {"ca": right.ca_cert, "other_ca": other.ca_cert, "certificate": pem}


def _stored(server: Orthanc, dicom_dir: Path) -> Orthanc:
    stow(server, sorted(dicom_dir.glob("*.dcm")))
    return server


@pytest.fixture(scope="module")
def https_pacs(
    pki: dict[str, Path], dicomweb_dicom_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Orthanc]:
    """Orthanc behind HTTPS (certificate of :func:`pki`'s CA) holding the slide."""
    with start_orthanc(
        tmp_path_factory.mktemp("orthanc-https"),
        certificate=pki["certificate"],
        ca_bundle=pki["ca"],
    ) as server:
        yield _stored(server, dicomweb_dicom_dir)


@pytest.fixture(scope="module")
def bearer_pacs(
    dicomweb_dicom_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Orthanc]:
    """Orthanc accepting only ``Authorization: Bearer TOKEN``, holding the slide."""
    with start_orthanc(tmp_path_factory.mktemp("orthanc-bearer"), bearer_token=TOKEN) as server:
        yield _stored(server, dicomweb_dicom_dir)


@pytest.fixture(scope="module")
def server(
    model_artifact: Path,
    served_runtime,
    slides_dir: Path,
    https_pacs: Orthanc,
    bearer_pacs: Orthanc,
    pki: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
):
    """A real in-process server with five DICOMweb entries: ``tls`` (the HTTPS PACS,
    its CA as tls.ca.pem), ``tls_noca`` (no CA file), ``tls_wrongca`` (another CA),
    ``bearer`` (the right token) and ``bearer_wrong`` (a wrong one)."""
    import certifi

    secrets_dir = tmp_path_factory.mktemp("credentials-secrets")
    (secrets_dir / "tls.ca.pem").write_bytes(pki["ca"].read_bytes())
    (secrets_dir / "tls_wrongca.ca.pem").write_bytes(pki["other_ca"].read_bytes())
    (secrets_dir / "bearer.token").write_text(TOKEN + "\n")
    (secrets_dir / "bearer_wrong.token").write_text(WRONG_TOKEN)
    entries = {
        "tls": https_pacs.dicomweb_url,
        "tls_noca": https_pacs.dicomweb_url,
        "tls_wrongca": https_pacs.dicomweb_url,
        "bearer": bearer_pacs.dicomweb_url,
        "bearer_wrong": bearer_pacs.dicomweb_url,
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REQUESTS_CA_BUNDLE", certifi.where())
        running = inprocess_server(
            model_artifact,
            served_runtime,
            slides_dir,
            dicomweb=",".join(f"{name}={url}" for name, url in entries.items()),
            dicomweb_secrets_dir=secrets_dir,
        )
        yield running
        running.stop(grace=0, drain=0)


def _series(name: str, dicom_dir: Path) -> pb.DicomWebSeries:
    import pydicom

    first = pydicom.dcmread(next(iter(sorted(dicom_dir.glob("*.dcm")))), stop_before_pixels=True)
    return pb.DicomWebSeries(
        server=name,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
    )


def _serves(stub) -> None:
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).model.name


def test_https_pacs_verified_with_its_ca_bundle_analyses(server, dicomweb_dicom_dir: Path) -> None:
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    request = pb.AnalyzeSlideRequest(dicomweb=_series("tls", dicomweb_dicom_dir))
    started, probs, _ = _analyze(stub, request)
    assert started is not None and started.dicom.dicomweb_server == "tls"
    assert len(probs) == started.grid.patch_count > 0


@pytest.mark.parametrize("name", ["tls_noca", "tls_wrongca"], ids=["no_ca", "wrong_ca"])
def test_untrusted_certificate_is_pacs_tls_failed_and_the_server_keeps_serving(
    server, https_pacs: Orthanc, dicomweb_dicom_dir: Path, name: str
) -> None:
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    request = pb.AnalyzeSlideRequest(dicomweb=_series(name, dicomweb_dicom_dir))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnalyzeSlide(request, timeout=120))
    assert status_of(info.value) == (grpc.StatusCode.FAILED_PRECONDITION, "PACS_TLS_FAILED")
    details = info.value.details() or ""
    assert f"{name!r}" in details and f"{name}.ca.pem" in details
    assert "not trusted" in details  # OpenSSL's reason, not a generic failure
    assert "127.0.0.1" not in details and str(https_pacs.base_url) not in details
    assert "retry_after_s" not in str(info.value.trailing_metadata())  # no retry hint
    _serves(stub)


def test_bearer_token_right_analyses_wrong_is_denied_and_never_logged(
    server,
    dicomweb_dicom_dir: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    right = pb.AnalyzeSlideRequest(dicomweb=_series("bearer", dicomweb_dicom_dir))
    started, probs, _ = _analyze(stub, right)
    assert started is not None and len(probs) == started.grid.patch_count > 0
    wrong = pb.AnalyzeSlideRequest(dicomweb=_series("bearer_wrong", dicomweb_dicom_dir))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnalyzeSlide(wrong, timeout=120))
    assert status_of(info.value) == (grpc.StatusCode.PERMISSION_DENIED, "PACS_PERMISSION_DENIED")
    details = info.value.details() or ""
    assert "'bearer_wrong'" in details and "HTTP 403" in details
    assert WRONG_TOKEN not in details and TOKEN not in details
    _serves(stub)
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert caplog.records  # the server did log (at DEBUG) while it served these calls
    assert TOKEN not in logged and WRONG_TOKEN not in logged
    assert "Bearer" not in logged


def test_a_ca_file_without_a_certificate_stops_the_configuration(tmp_path: Path) -> None:
    from histohelper.server.dicomweb import parse_endpoints

    (tmp_path / "pacs.ca.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(ValueError) as info:
        parse_endpoints("pacs=https://pacs.example.org/dicom-web", secrets_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("--dicomweb pacs: pacs.ca.pem holds no PEM CA certificate")
    assert str(tmp_path) not in message and "example" not in message


def test_a_host_name_mismatch_is_said_without_the_host() -> None:
    """OpenSSL's message quotes the host; PACS_TLS_FAILED says it in words. (The test
    certificates always name 127.0.0.1, so this one error is built, not provoked.)"""
    import ssl

    import requests

    from histohelper.errors import PacsTlsError
    from histohelper.server.dicomweb import translate

    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_code = 62
    cause.verify_message = "Hostname mismatch, certificate is not valid for 'pacs.internal'."
    try:
        try:
            raise cause
        except ssl.SSLError as exc:
            raise requests.exceptions.SSLError("wrapped") from exc
    except requests.exceptions.SSLError as exc:
        mapped = translate("pacs", exc)
    assert isinstance(mapped, PacsTlsError)
    assert "does not name the host" in mapped.message and "pacs.internal" not in mapped.message
