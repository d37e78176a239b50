"""``histohelper certs OUT_DIR``: a private CA with a server and a client certificate.

For a test deployment or a first try of TLS and mutual TLS, not for production (use
your organisation's PKI there). Writes, with the names the README and the server's
flags use:

============== ===================================================================
``ca.pem``     the CA certificate: the client's ``--ca`` (trust the server) and the
               server's ``--tls-client-ca`` (trust client certificates, mutual TLS)
``ca.key``     the CA's private key (0600): keep it offline; it signs new certificates
``server.pem`` the server certificate (``--tls-cert``), SANs ``localhost``,
               ``127.0.0.1``, ``::1`` and every ``--host``
``server.key`` its private key (``--tls-key``, 0600)
``client.pem`` a client certificate (``--cert``; its CN is the caller identity
               ``cert:<CN>`` in the audit log)
``client.key`` its private key (``--key``, 0600)
============== ===================================================================

Keys are ECDSA P-256, signatures SHA-256, built with the ``cryptography`` library
(the ``certs`` extra, see the README's Install; imported only when the command runs). The server
certificate carries extended key usage serverAuth, the client certificate clientAuth,
the CA basicConstraints CA:TRUE with path length 0 (RFC 5280 profile).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The files written, in order.
FILE_NAMES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")

#: Names every server certificate covers (the loopback forms the README and tests use).
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertificateFiles:
    """Paths of the files :func:`make_certificates` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def add_subcommands(subparsers: Any) -> None:
    """Register ``certs`` on the top-level parser (imports nothing heavy)."""
    p = subparsers.add_parser(
        "certs",
        help="make a test CA with server and client certificates for TLS / mutual TLS",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder for the six files")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address of the server (repeatable); localhost, "
        "127.0.0.1 and ::1 are always included",
    )
    p.add_argument(
        "--client-name",
        default="histohelper-client",
        help="CN of the client certificate: the caller identity (default %(default)s)",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``histohelper certs``: 0 written, 2 usage error (existing files, bad name)."""
    try:
        files = make_certificates(
            args.out_dir,
            hosts=args.host,
            client_name=args.client_name,
            days=args.days,
            overwrite=args.force,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"histohelper certs: error: {exc}", file=sys.stderr)
        return 2
    d = files.ca_cert.parent
    print(f"wrote {', '.join(FILE_NAMES)} to {d}")
    print(
        f"server: histohelper serve ... --tls-cert {files.server_cert} --tls-key "
        f"{files.server_key} [--tls-client-ca {files.ca_cert}]"
    )
    print(
        f"client: histohelper info --server localhost:50051 --ca {files.ca_cert} "
        f"[--cert {files.client_cert} --key {files.client_key}]"
    )
    return 0


def make_certificates(
    out_dir: str | os.PathLike[str],
    *,
    hosts: list[str] | tuple[str, ...] = (),
    client_name: str = "histohelper-client",
    days: int = 365,
    overwrite: bool = False,
) -> CertificateFiles:
    """Make a CA, a server and a client certificate in ``out_dir`` (created).

    Args:
        out_dir: folder for :data:`FILE_NAMES`.
        hosts: extra server names: IP literals become IP SANs, others DNS SANs.
        client_name: CN of the client certificate (1 to 64 characters).
        days: validity from one minute ago, 1 to 3650.
        overwrite: replace existing files (else :class:`FileExistsError`).

    Returns:
        The written paths. Keys are PKCS#8 PEM, unencrypted, mode 0600.

    Raises:
        FileExistsError: one of the files exists and ``overwrite`` is false (nothing
            is written).
        ValueError: ``days`` or ``client_name`` out of range, or an empty host name.
        ModuleNotFoundError: ``cryptography`` is missing (the ``certs`` extra).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not 1 <= days <= 3650:
        raise ValueError("--days must be in 1..3650")
    if not 1 <= len(client_name) <= 64:
        raise ValueError("--client-name must have 1 to 64 characters")
    if any(not h.strip() for h in hosts):
        raise ValueError("--host must not be empty")
    out = Path(out_dir)
    paths = CertificateFiles(*(out / name for name in FILE_NAMES))
    existing = [p.name for p in vars(paths).values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already in {out} (--force replaces them)")
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HistoHelper test deployment"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    def builder(subject: x509.Name, issuer: x509.Name, key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )

    def usage(cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not cert_sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("HistoHelper test CA")
    ca_cert = (
        builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def leaf(cn: str, eku: Any, sans: list[x509.GeneralName] | None) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            builder(name(cn), ca_name, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(authority, critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    names = list(dict.fromkeys([*DEFAULT_SERVER_NAMES, *(h.strip() for h in hosts)]))
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n.strip("[]"))))
        except ValueError:
            sans.append(x509.DNSName(n))
    server_cn = next((h.strip() for h in hosts), "localhost")
    server_cert, server_key = leaf(server_cn, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_cert, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    def pem_key(key: Any) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(path: Path, data: bytes, mode: int) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed it; keys stay 0600 regardless
        os.replace(tmp, path)

    pem = serialization.Encoding.PEM
    write(paths.ca_cert, ca_cert.public_bytes(pem), 0o644)
    write(paths.ca_key, pem_key(ca_key), 0o600)
    write(paths.server_cert, server_cert.public_bytes(pem), 0o644)
    write(paths.server_key, pem_key(server_key), 0o600)
    write(paths.client_cert, client_cert.public_bytes(pem), 0o644)
    write(paths.client_key, pem_key(client_key), 0o600)
    return paths
