"""Caller authentication and authorisation: bearer tokens, mutual-TLS identities, roles.

Tokens file (``--tokens-file``), JSON::

    {"tokens": [
        {"sha256": "<64 hex digits: SHA-256 of the token's UTF-8 bytes>",
         "identity": "lis-prod", "roles": ["analyze", "upload"]}
    ]}

Only hashes are stored; the server never stores, logs or echoes a raw token. A
presented token is hashed and compared with every stored hash in constant time
(``hmac.compare_digest``). ``roles`` defaults to ``["analyze"]``; ``"upload"`` is
needed for UploadSlide, ``"store"`` for StoreDicom, ``"admin"`` for
ModelAdminService. ``histohelper token --identity NAME --roles
analyze,upload --file tokens.json`` (or ``python -m histohelper.server.auth`` with the
same flags) makes a new random token: the token on stdout (give it to the caller), its
entry added to the tokens file (created if absent, existing entries kept), or printed
on stderr without ``--file``.

:class:`Authenticator` decides who calls; the call path
(:mod:`histohelper.server.callpath`) applies it to every call of the analysis service:

* with a tokens file, calls need ``authorization: Bearer <token>`` metadata: missing,
  malformed or unknown tokens get UNAUTHENTICATED; a known token without the RPC's
  role gets PERMISSION_DENIED (statuses from the error table, with ErrorInfo);
* without one, callers are trusted: ``cert:<CN>`` when mutual TLS presented a client
  certificate (the handshake already checked it against the client CA), else
  ``anonymous`` (the transport policy allows that only on loopback or by opt-in);
  ``anonymous`` lacks the ``admin`` role (model loading and unloading) unless the
  server runs with ``--allow-anonymous-admin``;
* ``grpc.health.v1.Health`` and server reflection stay open (load balancers and
  orchestrators probe them without credentials; they reveal no data);
* every call gets an audit record (:mod:`histohelper.server.audit`).

Which role each RPC needs is declared in the servicer's RPC table.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from histohelper.errors import UnauthenticatedError

log = logging.getLogger(__name__)

ROLE_ANALYZE = "analyze"
ROLE_UPLOAD = "upload"
ROLE_STORE = "store"
ROLE_ADMIN = "admin"
ROLES = frozenset({ROLE_ANALYZE, ROLE_UPLOAD, ROLE_STORE, ROLE_ADMIN})

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_IDENTITY = re.compile(r"^[A-Za-z0-9._@:/+-]{1,128}$")
_BEARER = re.compile(r"^Bearer[ \t]+([!-~]{1,4096})[ \t]*$", re.IGNORECASE)


class TokensFileError(ValueError):
    """The tokens file is missing, unreadable or malformed (never quotes its contents)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: identity for the audit log, roles for authorisation."""

    identity: str
    roles: frozenset[str]


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a token's UTF-8 bytes (what the tokens file stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """Accepted token hashes with their principals.

    Args:
        entries: ``(sha256 hex, principal)`` pairs.
    """

    def __init__(self, entries: Sequence[tuple[str, Principal]]) -> None:
        self._entries = [(bytes.fromhex(h), p) for h, p in entries]

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        """Read and validate a tokens file.

        Raises:
            TokensFileError: unreadable, not JSON, or an entry without a 64-hex-digit
                ``sha256``, a valid ``identity`` or known ``roles``.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TokensFileError(f"cannot read the tokens file ({exc.strerror})") from None
        except ValueError:
            raise TokensFileError("the tokens file is not valid JSON") from None
        items = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise TokensFileError('the tokens file needs {"tokens": [...]}')
        entries: list[tuple[str, Principal]] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) - {"sha256", "identity", "roles"}:
                raise TokensFileError(
                    f"tokens[{i}]: expected keys sha256, identity, roles (raw tokens are "
                    "never stored: hash them)"
                )
            digest = str(item.get("sha256", "")).lower()
            identity = item.get("identity")
            roles = item.get("roles", [ROLE_ANALYZE])
            if not _HEX64.match(digest):
                raise TokensFileError(f"tokens[{i}].sha256 must be 64 hex digits")
            if not isinstance(identity, str) or not _IDENTITY.match(identity):
                raise TokensFileError(f"tokens[{i}].identity must match {_IDENTITY.pattern}")
            if not isinstance(roles, list) or not set(roles) <= ROLES:
                raise TokensFileError(f"tokens[{i}].roles must be a list of {sorted(ROLES)}")
            entries.append((digest, Principal(identity, frozenset(roles))))
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, or None; compares with every hash in constant time."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Principal | None = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first ``authorization`` metadata entry.

    Raises:
        UnauthenticatedError: the entry is not ``Bearer <token>`` (printable ASCII).
    """
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        match = _BEARER.match(text)
        if match is None:
            raise UnauthenticatedError("authorization metadata must be 'Bearer <token>'")
        return match.group(1)
    return None


class Authenticator:
    """Decides who a caller is.

    Args:
        tokens: accepted tokens; None disables token authentication (callers are then
            identified by their client certificate, with all roles, else ``anonymous``,
            with every role but ``admin``).
        anonymous_admin: give ``anonymous`` the ``admin`` role too
            (``--allow-anonymous-admin``: a loopback-only development server).
    """

    def __init__(self, tokens: TokenStore | None, *, anonymous_admin: bool = False) -> None:
        self.tokens = tokens
        self.anonymous_roles = ROLES if anonymous_admin else ROLES - {ROLE_ADMIN}

    def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, client_cn: str | None
    ) -> Principal:
        """The caller's principal.

        Raises:
            UnauthenticatedError: tokens are required and none (or an unknown one) came.
        """
        token = bearer_token(metadata)
        if self.tokens is None:
            if client_cn:
                return Principal(f"cert:{client_cn}", ROLES)
            return Principal("anonymous", self.anonymous_roles)
        if token is None:
            raise UnauthenticatedError("missing bearer token (authorization: Bearer <token>)")
        principal = self.tokens.lookup(token)
        if principal is None:
            raise UnauthenticatedError("invalid bearer token")
        return principal


def client_common_name(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> str | None:
    """The subject CN of the client's TLS certificate (mutual TLS), or None."""
    try:
        values = context.auth_context().get("x509_common_name") or []
    except Exception:  # no auth context on this transport
        return None
    for value in values:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        return text[:128]
    return None


def new_token(identity: str, roles: Sequence[str]) -> tuple[str, dict[str, object]]:
    """A fresh random token (256 bits, URL-safe) and its tokens-file entry."""
    token = secrets.token_urlsafe(32)
    return token, {"sha256": hash_token(token), "identity": identity, "roles": list(roles)}


def add_token_to_file(path: Path, identity: str, roles: Sequence[str]) -> str:
    """Make a new token and add its entry to the tokens file ``path`` (created if absent).

    The existing entries are kept as they are; the file is validated first (a file the
    server would refuse is not touched) and replaced atomically, mode 0600.

    Returns:
        The new raw token (to hand to the caller; it is stored nowhere).

    Raises:
        TokensFileError: the existing file is unreadable or malformed.
    """
    doc: dict[str, object] = {"tokens": []}
    if path.exists():
        TokenStore.load(path)  # raises TokensFileError for a file the server would refuse
        doc = json.loads(path.read_text(encoding="utf-8"))
    token, entry = new_token(identity, roles)
    tokens = doc["tokens"]
    assert isinstance(tokens, list)  # checked by TokenStore.load
    tokens.append(entry)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return token


def _add_token_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identity", required=True, help="caller identity for the audit log")
    parser.add_argument(
        "--roles", default=ROLE_ANALYZE, help="comma-separated: analyze,upload,store,admin"
    )
    parser.add_argument(
        "--file",
        type=Path,
        metavar="TOKENS_JSON",
        help='add the entry to this tokens file ({"tokens": [...]}, created if absent, '
        "existing entries kept, mode 0600): the server's --tokens-file. Without it the "
        "entry is printed on stderr",
    )


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``token`` on the top-level parser."""
    p = subparsers.add_parser(
        "token",
        help="make a bearer token and add its hash to a tokens file",
        description="Make a random bearer token (256 bits) for --tokens-file: the token on "
        "stdout (give it to the caller; it is stored nowhere), its SHA-256 entry written to "
        "--file (or printed on stderr).",
    )
    _add_token_arguments(p)
    p.set_defaults(func=lambda args: _run_token(args, p))


def _run_token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    roles = [r for r in args.roles.split(",") if r]
    if not _IDENTITY.match(args.identity) or not set(roles) <= ROLES:
        parser.error(f"identity must match {_IDENTITY.pattern}; roles in {sorted(ROLES)}")
    if args.file is not None:
        try:
            token = add_token_to_file(args.file, args.identity, roles)
        except TokensFileError as exc:
            print(f"{parser.prog}: error: {exc}; the file was not changed", file=sys.stderr)
            return 2
        print(token)
        print(f"added {args.identity} ({', '.join(roles)}) to {args.file}", file=sys.stderr)
        return 0
    token, entry = new_token(args.identity, roles)
    print(token)
    print(json.dumps(entry), file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m histohelper.server.auth``: as ``histohelper token``."""
    parser = argparse.ArgumentParser(description="make a bearer token for --tokens-file")
    _add_token_arguments(parser)
    return _run_token(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
