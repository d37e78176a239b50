"""Helpers for the hardening tests: a throwaway PKI, tokens files, raw stubs, statuses.

Certificates are generated per test session with the ``cryptography`` package: one
CA signs the server certificate (SAN ``localhost`` and ``127.0.0.1``) and a client
certificate (CN ``lis-client``); a second, untrusted CA signs a rogue client
certificate. Nothing is downloaded and nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

TINY = "real/tiny-16px.svs"
CMU = "real/CMU-1-Small-Region.svs"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    cn: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


@dataclass(frozen=True)
class Pki:
    """PEM bytes and file paths of a test PKI."""

    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    rogue_cert: bytes
    rogue_key: bytes
    ca_path: Path
    server_cert_path: Path
    server_key_path: Path


def make_pki(directory: Path) -> Pki:
    """Generate the CA, server, client and rogue-client certificates into ``directory``."""
    ca_key, ca_cert = _ca("HistoHelper test CA")
    rogue_ca_key, rogue_ca_cert = _ca("Untrusted CA")
    server_cert, server_key = _leaf("localhost", ca_key, ca_cert, server=True)
    client_cert, client_key = _leaf("lis-client", ca_key, ca_cert, server=False)
    rogue_cert, rogue_key = _leaf("lis-client", rogue_ca_key, rogue_ca_cert, server=False)
    ca = ca_cert.public_bytes(serialization.Encoding.PEM)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca.pem": ca,
        "server.pem": server_cert,
        "server.key": server_key,
    }
    for name, data in paths.items():
        (directory / name).write_bytes(data)
    return Pki(
        ca,
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
    )


def write_tokens(path: Path, entries: dict[str, tuple[str, list[str]]]) -> Path:
    """Write a tokens file: ``{raw token: (identity, roles)}`` stored as SHA-256 hashes."""
    from histohelper.server.auth import hash_token

    path.write_text(
        json.dumps(
            {
                "tokens": [
                    {"sha256": hash_token(token), "identity": identity, "roles": roles}
                    for token, (identity, roles) in entries.items()
                ]
            }
        )
    )
    return path


def insecure_stub(target: str) -> pb_grpc.SlideAnalysisServiceStub:
    """A raw stub on a plaintext channel (64 MiB receive limit)."""
    channel = grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    )
    return pb_grpc.SlideAnalysisServiceStub(channel)


def status_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Status code and ErrorInfo reason ("" without one) of a failed call."""
    reason = ""
    status = rpc_status.from_call(err)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return err.code(), reason


def read_audit(path: Path) -> list[dict[str, object]]:
    """The audit file's JSON lines."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


#: The upload area's bookkeeping: the area lock, each server's lock and private folder
#: (whatever is inside a private folder, an upload in flight say, is not bookkeeping).
_AREA_BOOKKEEPING = re.compile(r"^(?:area\.lock|replicas|replicas/[0-9a-f]{16}(?:\.lock)?)$")


def upload_files(directory: Path) -> list[str]:
    """:func:`own_files` of an upload area in use, less its bookkeeping: the uploads
    (``<id>``, ``<id>/slide<suffix>``, ``<id>/upload.json``) and the files in flight."""
    return [p for p in own_files(directory) if not _AREA_BOOKKEEPING.match(p)]


def own_files(directory: Path) -> list[str]:
    """Relative paths of the files and folders in an upload area (partial or stored)."""
    if not directory.exists():
        return []
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))
