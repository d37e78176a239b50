"""TLS and bearer-token call credentials against a real TLS server (self-signed, loopback)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from client_fakes import Script, ScriptedServicer

from histohelper.client import SlideClient
from histohelper.errors import ServerUnavailableError
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def self_signed(host: str = "localhost") -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_server() -> Iterator[tuple[str, bytes, Script]]:
    cert, key = self_signed()
    script = Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SlideAnalysisServiceServicer_to_server(ScriptedServicer(script), server)
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    yield f"localhost:{port}", cert, script
    server.stop(grace=None)


def test_tls_with_token_sends_bearer_call_credentials(tls_server) -> None:
    target, cert, script = tls_server
    with SlideClient(target, root_certificates=cert, token="abc") as client:
        assert client.get_model_info().model.name == "fake-model"
    assert script.received_metadata[0]["authorization"] == "Bearer abc"


def test_tls_with_unknown_root_fails_cleanly(tls_server) -> None:
    target, _, _ = tls_server
    other, _ = self_signed()
    with (
        SlideClient(target, root_certificates=other, retry=None, timeout=5) as client,
        pytest.raises(ServerUnavailableError),
    ):
        client.get_model_info()
