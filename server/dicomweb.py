"""Slides in a PACS: the DICOMweb servers the operator configured, and series on them.

The operator names each server (``serve --dicomweb NAME=URL``); a request names only
the server, the study and the series (``DicomWebSeries``), so the server never
connects anywhere the operator did not configure. Credentials come from files in
``--dicomweb-secrets-dir`` (``NAME.token``: a bearer token; ``NAME.basic``:
``user:password``; ``NAME.ca.pem``: a CA bundle for HTTPS), never from requests; no
URL, credential or UID is logged. The files are checked (``stat``: inode, size, mtime,
ctime) before every HTTP request and read again when one changed, so a rotated token
or a fixed ``NAME.basic`` is used from the next request on, without a restart; a file
that became unreadable or malformed fails the calls that need it (PACS_PERMISSION_DENIED,
PACS_TLS_FAILED for ``NAME.ca.pem``) naming only the entry and the file, until fixed.

Reading: a series is checked with QIDO-RS (exists? a VL Whole Slide Microscopy
series?), then opened with wsidicom over dicomweb-client (metadata by WADO-RS, frames
on demand; the whole series is never downloaded). Opened series are pooled for a
short while, so the tiler and the reader threads of one analysis share one series
and its frame cache; several reader threads keep several frame requests in flight.
The pool is only a speed-up: every reuse of a pooled series first asks the PACS again
with a QIDO-RS query of the series' instances, so a series deleted on the PACS, or
whose access was revoked, is refused (SLIDE_NOT_FOUND, PACS_PERMISSION_DENIED) and
dropped from the pool, and one whose SOP Instance UIDs changed since it was opened
(levels stored or deleted) is opened again. Frames are fetched in the transfer syntax
each instance is stored in (:mod:`.dicomweb_syntax`), so the PACS never transcodes
them (lossless stays lossless; JPEG 2000 opens on a PACS that cannot transcode it).

Storing: :meth:`DicomWebServers.store` sends Part 10 instances with STOW-RS.

HTTP failures map onto the error table: unreachable or timing out -> PACS_UNAVAILABLE
(with ``retry_after_s``), 401/403 -> PACS_PERMISSION_DENIED naming the configured
server, a certificate that ``NAME.ca.pem`` (or the system CAs) does not trust or that
does not name the host -> PACS_TLS_FAILED (a configuration problem: no retry hint),
unknown UIDs -> SLIDE_NOT_FOUND, not a brightfield WSI -> SLIDE_UNSUPPORTED;
a frame that cannot be fetched or decoded is one failed patch read (SLIDE_CORRUPT
only past the reader's failure tolerance).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from histohelper.errors import (
    DicomWebNotConfiguredError,
    HistoHelperError,
    PacsPermissionDeniedError,
    PacsTlsError,
    PacsUnavailableError,
    SlideNotFoundError,
    UnsupportedSlideError,
)
from histohelper.server.dicomweb_syntax import series_client
from histohelper.server.tiling.dicom import VL_WSI_SOP_CLASS, DicomSeries, DicomSlide, refusal

log = logging.getLogger(__name__)

#: Seconds a client should wait before retrying after PACS_UNAVAILABLE.
RETRY_AFTER_S = 10
#: How many opened series stay pooled while no analysis uses them, and for how long.
MAX_IDLE_SERIES = 4
IDLE_SERIES_TTL_S = 60.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: A DICOM UID (PS3.5 9.1): components of digits without leading zeros (a lone 0 is
#: allowed), joined by dots; the client's ``check_uid`` applies the same rule.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX_CHARS = 64


@dataclass(frozen=True)
class DicomWebEndpoint:
    """One configured DICOMweb server.

    Attributes:
        name: the operator's name for it (what requests use).
        url: DICOMweb root (``https://pacs.example/dicom-web``); never logged.
        bearer_token: from ``NAME.token``, or None.
        basic: ``(user, password)`` from ``NAME.basic``, or None.
        ca_bundle: ``NAME.ca.pem`` when present (verifies the server's certificate).
        timeout_s: connect and read timeout of each HTTP request.
        files: the credentials files, re-read when they change (None: the credentials
            above never change).

    ``bearer_token``, ``basic`` and ``ca_bundle`` are those read at start-up; HTTP
    requests use :meth:`credentials` (the files as they are now).
    """

    name: str
    url: str = field(repr=False)
    bearer_token: str | None = field(default=None, repr=False)
    basic: tuple[str, str] | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    timeout_s: float = 30.0
    files: CredentialFiles | None = field(default=None, repr=False, compare=False)

    def credentials(self) -> Credentials:
        """The credentials to send now (re-read from the files when they changed).

        Raises:
            PacsPermissionDeniedError: ``NAME.token`` / ``NAME.basic`` became unreadable
                or malformed (or both exist).
            PacsTlsError: ``NAME.ca.pem`` became unreadable or holds no certificate.
        """
        if self.files is None:
            return Credentials(self.bearer_token, self.basic, self.ca_bundle)
        return self.files.current()


@dataclass(frozen=True)
class Credentials:
    """What authenticates this server to one PACS (never logged, never in a repr).

    Attributes:
        bearer_token: from ``NAME.token``, or None.
        basic: ``(user, password)`` from ``NAME.basic``, or None.
        ca_bundle: ``NAME.ca.pem`` when present.
    """

    bearer_token: str | None = field(default=None, repr=False)
    basic: tuple[str, str] | None = field(default=None, repr=False)
    ca_bundle: Path | None = None


class CredentialsFileError(ValueError):
    """A credentials file of entry ``name`` is unreadable or malformed; the message
    (``--dicomweb NAME: ...``) names the entry and the file, never its content.

    Attributes:
        name: the entry.
        file: the file's name (``NAME.basic``...).
        problem: what is wrong, in words.
    """

    def __init__(self, name: str, file: str, problem: str) -> None:
        super().__init__(f"--dicomweb {name}: {problem}")
        self.name, self.file, self.problem = name, file, problem


def read_credentials(secrets_dir: Path, name: str) -> Credentials:
    """The credentials of entry ``name`` from ``NAME.token`` / ``NAME.basic`` /
    ``NAME.ca.pem`` in ``secrets_dir`` (absent files: none of that kind).

    Raises:
        CredentialsFileError: a file is unreadable or malformed, both a token and a
            user:password are given, or OpenSSL loads no certificate from the CA file.
    """
    token = basic = ca = None
    token_file = secrets_dir / f"{name}.token"
    basic_file = secrets_dir / f"{name}.basic"
    ca_file = secrets_dir / f"{name}.ca.pem"
    if token_file.is_file():
        token = _read_secret(token_file, name) or None
    if basic_file.is_file():
        user, colon, password = _read_secret(basic_file, name).partition(":")
        if not colon or not user:
            raise CredentialsFileError(
                name, basic_file.name, f"{name}.basic must hold user:password"
            )
        basic = (user, password)
    if token and basic:
        raise CredentialsFileError(
            name, basic_file.name, f"give {name}.token or {name}.basic, not both"
        )
    ca = ca_file if ca_file.is_file() else None
    if ca is not None:
        _check_ca_bundle(ca, name)
    return Credentials(token, basic, ca)


#: The credentials files of an entry, by suffix.
_CREDENTIAL_SUFFIXES = (".token", ".basic", ".ca.pem")


class CredentialFiles:
    """The credentials files of one entry, read again whenever they change.

    :meth:`current` stats the three files (inode, size, mtime, ctime; symlinks
    followed, so a Kubernetes secret volume's atomic swap counts) and reads them again
    only when that changed: a few microseconds per HTTP request. A file found
    unusable is reported (one WARNING per change, naming the entry and the file only)
    and read again at the next request, so fixing it is enough.

    Args:
        secrets_dir: ``--dicomweb-secrets-dir``.
        name: the entry.
        initial: the credentials read at start-up (``None``: read at the first use).

    Thread-safe.
    """

    def __init__(self, secrets_dir: Path, name: str, initial: Credentials | None = None) -> None:
        self.secrets_dir = secrets_dir
        self.name = name
        self._lock = threading.Lock()
        self._current = initial
        self._signature = self._stat() if initial is not None else None
        self._reported: object = None  # the signature whose failure was logged

    def _stat(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        out: list[tuple[int, int, int, int] | None] = []
        for suffix in _CREDENTIAL_SUFFIXES:
            try:
                st = os.stat(self.secrets_dir / f"{self.name}{suffix}")
            except OSError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    def current(self) -> Credentials:
        """The credentials as the files hold them now.

        Raises:
            PacsPermissionDeniedError: ``NAME.token`` / ``NAME.basic`` unreadable or
                malformed, or both given.
            PacsTlsError: ``NAME.ca.pem`` unreadable or without a certificate.
        """
        signature = self._stat()
        with self._lock:
            if signature == self._signature and self._current is not None:
                return self._current
            try:
                found = read_credentials(self.secrets_dir, self.name)
            except CredentialsFileError as exc:
                if self._reported != signature:
                    self._reported = signature
                    log.warning(
                        "DICOMweb credentials of %r unusable (%s): calls to it fail until "
                        "the file is fixed",
                        self.name,
                        exc.problem,
                    )
                raise _credentials_error(exc) from None
            changed = self._current is not None and found != self._current
            self._signature, self._current, self._reported = signature, found, None
        if changed:
            log.info("DICOMweb credentials of %r changed on disk: read again", self.name)
        return found


def _credentials_error(exc: CredentialsFileError) -> HistoHelperError:
    """The call's error for a credentials file that became unusable while serving."""
    what = (
        f"its credentials file {exc.file} in --dicomweb-secrets-dir is unusable "
        f"({exc.problem}); the operator must fix it"
    )
    if exc.file.endswith(".ca.pem"):
        lead = f"the HTTPS connection to the DICOMweb server {exc.name!r} cannot be verified"
        return PacsTlsError(f"{lead}: {what}", dicomweb_server=exc.name)
    return PacsPermissionDeniedError(
        f"this server cannot authenticate to the DICOMweb server {exc.name!r}: " + what,
        dicomweb_server=exc.name,
    )


def parse_endpoints(
    text: str, secrets_dir: Path | None = None, timeout_s: float = 30.0
) -> dict[str, DicomWebEndpoint]:
    """The configured servers from ``NAME=URL[,NAME=URL...]`` and the secrets folder.

    Args:
        text: comma-separated ``NAME=URL`` entries (``serve --dicomweb``, repeatable).
        secrets_dir: folder of ``NAME.token`` / ``NAME.basic`` / ``NAME.ca.pem`` files.
        timeout_s: HTTP timeout per request (s).

    Returns:
        ``{name: endpoint}``.

    Raises:
        ValueError: a malformed entry, a duplicate name, a URL that is not http(s) or
            carries credentials, a secrets folder that is not a directory, an unreadable
            or malformed credentials file, a ``NAME.ca.pem`` without a PEM certificate
            that OpenSSL loads. Messages name the entry's NAME, never its URL
            or a credential.
    """
    if secrets_dir is not None and not secrets_dir.is_dir():
        raise ValueError("--dicomweb-secrets-dir is not a directory")
    out: dict[str, DicomWebEndpoint] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, url = entry.partition("=")
        name, url = name.strip(), url.strip().rstrip("/")
        if not sep or not _NAME.match(name):
            raise ValueError(
                "--dicomweb takes NAME=URL (NAME: letters, digits, '_', '.', '-'; up to 64)"
            )
        if name in out:
            raise ValueError(f"--dicomweb: the name {name!r} is given twice")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - a port that is not a number raises ValueError
        except ValueError:
            raise ValueError(f"--dicomweb {name}: the URL is malformed") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--dicomweb {name}: the URL must be http:// or https://")
        if parts.username or parts.password:
            raise ValueError(
                f"--dicomweb {name}: put credentials in --dicomweb-secrets-dir, not the URL"
            )
        if secrets_dir is None:
            out[name] = DicomWebEndpoint(name, url, timeout_s=float(timeout_s))
            continue
        found = read_credentials(secrets_dir, name)
        files = CredentialFiles(secrets_dir, name, found)
        out[name] = DicomWebEndpoint(
            name, url, found.bearer_token, found.basic, found.ca_bundle, float(timeout_s), files
        )
    return out


def _read_secret(path: Path, name: str) -> str:
    """The stripped text of a credentials file (CredentialsFileError naming only the
    file)."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsFileError(
            name, path.name, f"cannot read {path.name} ({type(exc).__name__})"
        ) from None


def _check_ca_bundle(path: Path, name: str) -> None:
    """ValueError naming only the file when OpenSSL loads no certificate from ``path``
    (requests would otherwise fail on the first connection, as a TLS error)."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsFileError(
            name,
            path.name,
            f"{path.name} holds no PEM CA certificate OpenSSL can load ({type(exc).__name__})",
        ) from None


def _session(endpoint: DicomWebEndpoint) -> Any:
    """A ``requests.Session`` with the endpoint's credentials, CA bundle and timeout.

    The credentials are those of :meth:`DicomWebEndpoint.credentials` at each request
    (a pooled series' session follows a rotated token). The CA bundle is passed with
    every request, not as ``session.verify``: requests lets ``REQUESTS_CA_BUNDLE`` /
    ``CURL_CA_BUNDLE`` in the environment override a session's ``verify``
    (psf/requests#4650, #3829), which would silently drop ``NAME.ca.pem`` on hosts that
    set them (many container images do).
    """
    import requests

    class _Session(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            found = endpoint.credentials()
            kwargs.setdefault("timeout", endpoint.timeout_s)
            if found.ca_bundle is not None:
                kwargs.setdefault("verify", str(found.ca_bundle))
            if found.bearer_token:
                headers = dict(kwargs.get("headers") or {})
                headers["Authorization"] = f"Bearer {found.bearer_token}"
                kwargs["headers"] = headers
            elif found.basic:
                kwargs.setdefault("auth", found.basic)
            return super().request(*args, **kwargs)

    return _Session()


def translate(name: str, exc: BaseException, *, opening: bool = False) -> HistoHelperError | None:
    """The error a caller sees for an exception from talking to PACS ``name``.

    Args:
        name: the configured server name (safe to show: the operator chose it).
        exc: what requests, dicomweb-client or wsidicom raised.
        opening: True while the series is being found and opened (a 404 then means
            unknown UIDs); False for frame reads (a 404 is one failed read).

    Returns:
        PacsUnavailableError, PacsPermissionDeniedError, PacsTlsError or
        SlideNotFoundError, or None when the exception means "this read failed"
        (counted against the tolerance).
    """
    import requests

    if isinstance(exc, HistoHelperError):
        return exc
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return PacsPermissionDeniedError(
                f"the DICOMweb server {name!r} refused this server's credentials "
                f"(HTTP {status}); the operator must fix them",
                dicomweb_server=name,
            )
        if status == 404 and opening:
            return SlideNotFoundError("the DICOM series was not found on the DICOMweb server")
        if status in (408, 429) or status >= 500:
            return _unavailable(name, f"HTTP {status}")
        return None
    if isinstance(exc, requests.exceptions.SSLError):  # before ConnectionError, its base
        return _tls_failed(name, exc)
    if isinstance(exc, requests.Timeout):
        return _unavailable(name, "it did not answer within the timeout")
    if isinstance(exc, requests.ConnectionError):
        return _unavailable(name, "no connection could be made")
    return None


def _tls_failed(name: str, exc: BaseException) -> PacsTlsError:
    """PACS_TLS_FAILED for ``name``: what OpenSSL objected to, never the URL or host.

    The certificate error is found in the exception's chain (requests wraps urllib3,
    which wraps :class:`ssl.SSLCertVerificationError`); a host-name mismatch is said in
    words (OpenSSL's own message quotes the host).
    """
    seen: set[int] = set()
    todo: list[object] = [exc]
    what = "the TLS handshake failed"
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            what = (
                "its certificate does not name the host of the configured URL"
                if item.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH
                else f"its certificate is not trusted: {item.verify_message}"
            )
            break
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return PacsTlsError(
        f"the HTTPS connection to the DICOMweb server {name!r} failed TLS verification "
        f"({what}); the operator must give its CA as {name}.ca.pem in "
        "--dicomweb-secrets-dir (retrying will not help)",
        dicomweb_server=name,
    )


def _unavailable(name: str, what: str) -> PacsUnavailableError:
    return PacsUnavailableError(
        f"the DICOMweb server {name!r} is unavailable ({what}); retry in "
        f"{RETRY_AFTER_S} s or later",
        dicomweb_server=name,
        retry_after_s=str(RETRY_AFTER_S),
    )


#: Libraries that put UIDs or URLs into their log records (dicomweb-client logs
#: "search for series of study <UID>" at INFO, urllib3 every URL at DEBUG, wsidicom
#: instance UIDs through the root logger).
_CHATTY_LOGGERS = ("dicomweb_client", "wsidicom", "urllib3.connectionpool")


def _from_chatty_library(record: logging.LogRecord) -> bool:
    """False (drop) for a record logged through the root logger by wsidicom or
    dicomweb-client (they call ``logging.info`` directly)."""
    path = record.pathname.replace("\\", "/")
    return not ("/wsidicom/" in path or "/dicomweb_client/" in path)


def quiet_library_logs() -> None:
    """Keep UIDs and URLs of the DICOMweb libraries out of the server's logs.

    Their loggers are raised to CRITICAL and their records on the root logger are
    dropped. Called when the servers are configured (server start-up), never at
    import; idempotent.
    """
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    root = logging.getLogger()
    if _from_chatty_library not in root.filters:
        root.addFilter(_from_chatty_library)


@dataclass
class _Pooled:
    series: DicomSeries
    users: int = 0
    idle_since: float = 0.0
    #: The series' SOP Instance UIDs when it was opened (QIDO-RS).
    instances: frozenset[str] = frozenset()


class DicomWebServers:
    """The configured DICOMweb servers and a small pool of opened series.

    Args:
        endpoints: from :func:`parse_endpoints` (may be empty: nothing configured).

    Thread-safe.
    """

    def __init__(self, endpoints: dict[str, DicomWebEndpoint]) -> None:
        self.endpoints = dict(endpoints)
        quiet_library_logs()
        self._pool: OrderedDict[tuple[str, str, str], _Pooled] = OrderedDict()
        #: Series taken out of the pool while analyses still read them (their content
        #: changed on the PACS), by id; closed when the last one gives them back.
        self._retired: dict[int, _Pooled] = {}
        self._lock = threading.Lock()

    def endpoint(self, name: str) -> DicomWebEndpoint:
        """The endpoint called ``name``.

        Raises:
            DicomWebNotConfiguredError: no such name (or none configured).
        """
        found = self.endpoints.get(name)
        if found is None:
            raise DicomWebNotConfiguredError(
                "no DICOMweb server is configured on this server"
                if not self.endpoints
                else "that DICOMweb server is not configured on this server (serve --dicomweb)"
            )
        return found

    def client(self, name: str) -> Any:
        """A ``dicomweb_client.DICOMwebClient`` for ``name`` (credentials applied).

        Raises:
            DicomWebNotConfiguredError: no such name.
            PacsPermissionDeniedError, PacsTlsError: a credentials file of ``name``
                became unusable (:meth:`DicomWebEndpoint.credentials`).
        """
        from dicomweb_client import DICOMwebClient

        endpoint = self.endpoint(name)
        endpoint.credentials()  # a credentials file that became unusable: its error now
        client = DICOMwebClient(endpoint.url, session=_session(endpoint))
        # dicomweb-client retries 5 times with exponential back-off by default (31 s
        # on a closed port): one quick retry, then PACS_UNAVAILABLE with a retry hint.
        client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=100)
        return client

    def source(self, name: str, study_uid: str, series_uid: str) -> DicomWebSource:
        """The request's series as a slide source (nothing is fetched yet).

        Raises:
            DicomWebNotConfiguredError: ``name`` is not configured.
            InvalidOptionsError: a UID is missing or malformed.
        """
        from histohelper.errors import InvalidOptionsError

        self.endpoint(name)
        for what, uid in (("study", study_uid), ("series", series_uid)):
            if not _UID.fullmatch(uid or "") or len(uid) > UID_MAX_CHARS:
                raise InvalidOptionsError(
                    f"dicomweb: the {what} instance UID is not a DICOM UID (digits and dots, "
                    f"no leading zeros in a component, at most {UID_MAX_CHARS} characters)"
                )
        return DicomWebSource(self, name, study_uid, series_uid)

    # --- the pool of opened series --------------------------------------------------------

    def acquire(self, key: tuple[str, str, str]) -> DicomSeries:
        """An opened series for ``(name, study, series)``, pooled or newly opened.

        A pooled series is used again only after a QIDO-RS query (:meth:`check_series`)
        finds it still there, accessible and holding the same instances (SOP Instance
        UIDs) as when it was opened; one that is gone or refused is dropped from the
        pool, one whose instances changed (levels stored or deleted since) is opened
        again (the old one is closed when the analyses reading it are done).

        Raises:
            As :meth:`open_series`.
        """
        stale: list[DicomSeries] = []
        with self._lock:
            now = time.monotonic()
            for k in [k for k, p in self._pool.items() if not p.users]:
                if now - self._pool[k].idle_since > IDLE_SERIES_TTL_S:
                    stale.append(self._pool.pop(k).series)
            pooled = self._pool.get(key)
            if pooled is not None:
                pooled.users += 1
                self._pool.move_to_end(key)
        for series in stale:
            series.close()
        if pooled is not None:
            try:
                instances = self.check_series(*key)
            except (SlideNotFoundError, PacsPermissionDeniedError):
                self._drop(key, pooled.series)
                raise
            except BaseException:
                self.release(pooled.series)
                raise
            if instances == pooled.instances:
                return pooled.series
            self._retire(key, pooled)
        series, instances = self._open(*key)
        extra: DicomSeries | None
        with self._lock:
            if key in self._pool and self._pool[key].instances == instances:
                self._pool[key].users += 1  # opened twice at once: keep the pooled one
                extra, series = series, self._pool[key].series
            else:
                old = self._pool.get(key)
                extra = old.series if old and self._retire_locked(key, old) else None
                self._pool[key] = _Pooled(series, users=1, instances=instances)
        if extra is not None:
            extra.close()
        return series

    def _retire(self, key: tuple[str, str, str], pooled: _Pooled) -> None:
        """Take ``pooled`` (acquired once by the caller) out of the pool: closed now when
        no other analysis reads it, else when the last one releases it."""
        with self._lock:
            pooled.users -= 1
            closing = self._retire_locked(key, pooled)
        if closing:
            pooled.series.close()

    def _retire_locked(self, key: tuple[str, str, str], pooled: _Pooled) -> bool:
        """:meth:`_retire` under the lock; True when the caller must close the series."""
        if self._pool.get(key) is pooled:
            del self._pool[key]
        if pooled.users > 0:
            self._retired[id(pooled.series)] = pooled
            return False
        return True

    def release(self, series: DicomSeries) -> None:
        """Give back a series from :meth:`acquire`; idle ones beyond
        :data:`MAX_IDLE_SERIES` are closed, least recently used first."""
        evicted: list[DicomSeries] = []
        with self._lock:
            for pooled in self._pool.values():
                if pooled.series is series:
                    pooled.users -= 1
                    pooled.idle_since = time.monotonic()
                    break
            else:
                retired = self._retired.get(id(series))
                if retired is not None and retired.series is series:
                    retired.users -= 1
                    if retired.users <= 0:
                        del self._retired[id(series)]
                        evicted.append(series)
                else:
                    evicted.append(series)
            idle = [k for k, p in self._pool.items() if not p.users]
            for k in idle[: max(0, len(idle) - MAX_IDLE_SERIES)]:
                evicted.append(self._pool.pop(k).series)
        for s in evicted:
            s.close()

    def _drop(self, key: tuple[str, str, str], series: DicomSeries) -> None:
        """Give back ``series`` and, when no analysis still reads it, take it out of the
        pool and close it (one still in use stays pooled; every reuse checks again)."""
        with self._lock:
            pooled = self._pool.get(key)
            unused = pooled is not None and pooled.series is series and pooled.users == 1
            if unused:
                del self._pool[key]
        if unused:
            series.close()
        else:
            self.release(series)

    def close(self) -> None:
        """Close every pooled series."""
        with self._lock:
            items = [p.series for p in self._pool.values()]
            self._pool.clear()
        for series in items:
            series.close()

    def open_series(self, name: str, study_uid: str, series_uid: str) -> DicomSeries:
        """Find the series with QIDO-RS and open it with wsidicom (metadata only).

        Raises:
            As :meth:`_open`.
        """
        return self._open(name, study_uid, series_uid)[0]

    def _open(
        self, name: str, study_uid: str, series_uid: str
    ) -> tuple[DicomSeries, frozenset[str]]:
        """:meth:`open_series`, and the SOP Instance UIDs QIDO-RS found before opening.

        Frames are fetched in the transfer syntax they are stored in
        (:mod:`.dicomweb_syntax`), so that the PACS never transcodes them.

        Raises:
            SlideNotFoundError: no such study/series on the server.
            UnsupportedSlideError: not a VL Whole Slide Microscopy series, fluorescence
                or monochrome, no VOLUME (pyramid) image, a pyramid the PACS serves in no
                transfer syntax our decoders read, or wsidicom cannot read it.
            PacsUnavailableError, PacsPermissionDeniedError: from the server.
            DicomWebNotConfiguredError: ``name`` is not configured.
        """
        from wsidicom import WsiDicom

        client = self.client(name)
        search = client.search_for_instances
        found = self._query(
            name, search, (study_uid, series_uid), series_uid, ["SOPClassUID", "SOPInstanceUID"]
        )
        classes = {str(item.get("00080016", {}).get("Value", [""])[0]) for item in found}
        if VL_WSI_SOP_CLASS not in classes:
            raise UnsupportedSlideError(
                "the DICOM series is not a whole-slide image (no VL Whole Slide "
                "Microscopy Image instances)"
            )
        endpoint = self.endpoint(name)

        def frame_url(study: str, series: str, instance: str) -> str:
            return f"{endpoint.url}/studies/{study}/series/{series}/instances/{instance}/frames/1"

        web = series_client(client, _session(endpoint), frame_url, name)
        try:
            wsi = WsiDicom.open_web(web, study_uid, series_uid)
        except Exception as exc:
            mapped = translate(name, exc, opening=True) or web.refusal()
            raise mapped or self._opening_error(name, exc) from None
        refused = web.refusal()
        if refused is not None:
            wsi.close()
            raise refused
        try:
            return DicomSeries(wsi, lambda exc: translate(name, exc), name), _instance_uids(found)
        except BaseException:
            wsi.close()
            raise

    def check_series(self, name: str, study_uid: str, series_uid: str) -> frozenset[str]:
        """Ask the PACS (QIDO-RS query of the series' instances) whether the series is
        still there, and which instances it holds now.

        Returns:
            The series' SOP Instance UIDs.

        Raises:
            SlideNotFoundError: the study or series is gone.
            PacsPermissionDeniedError, PacsUnavailableError: from the server.
        """
        search = self.client(name).search_for_instances
        found = self._query(name, search, (study_uid, series_uid), series_uid, ["SOPInstanceUID"])
        return _instance_uids(found)

    def _query(
        self, name: str, search: Any, path: tuple[str, ...], series_uid: str, fields: list[str]
    ) -> list[dict[str, Any]]:
        """QIDO-RS: ``search(*path)`` filtered on ``series_uid``, returning ``fields``
        (one request: the PACS's first page of results, as wsidicom lists instances).

        Raises:
            SlideNotFoundError: nothing found; the errors of :func:`translate`.
        """
        try:
            found = search(*path, fields=fields, search_filters={"SeriesInstanceUID": series_uid})
        except Exception as exc:
            raise self._opening_error(name, exc) from None
        if not found:
            raise SlideNotFoundError("the DICOM series was not found on the DICOMweb server")
        return list(found)

    @staticmethod
    def _opening_error(name: str, exc: BaseException) -> HistoHelperError:
        mapped = translate(name, exc, opening=True)
        if mapped is not None:
            return mapped
        log.warning("opening a DICOMweb series failed: %s", type(exc).__name__)
        return refusal(exc)  # the same words as for local files

    # --- STOW-RS ------------------------------------------------------------------------

    def store(self, name: str, datasets: Sequence[Any]) -> None:
        """Store pydicom datasets on ``name`` with STOW-RS.

        Raises:
            DicomWebNotConfiguredError, PacsUnavailableError, PacsPermissionDeniedError;
            DicomInvalidError when the server refuses the instances (HTTP 4xx).
        """
        from histohelper.errors import DicomInvalidError

        client = self.client(name)
        try:
            client.store_instances(list(datasets))
        except Exception as exc:
            mapped = translate(name, exc)
            if mapped is not None:
                raise mapped from None
            status = getattr(getattr(exc, "response", None), "status_code", None)
            raise DicomInvalidError(
                f"the DICOMweb server {name!r} refused the instances (HTTP {status})"
                if status
                else "the instances could not be encoded for STOW-RS (not sent)"
            ) from None


def _instance_uids(found: list[dict[str, Any]]) -> frozenset[str]:
    """The SOP Instance UIDs (0008,0018) of QIDO-RS instance results."""
    return frozenset(str(item.get("00080018", {}).get("Value", [""])[0]) for item in found)


@dataclass(frozen=True)
class DicomWebSource:
    """A DICOM WSI series on a configured DICOMweb server, as a slide source.

    What a request's ``dicomweb`` field resolves to; the analysis opens it with
    :meth:`open` wherever it would open a file (:func:`~.tiling.slide.open_slide`).

    Attributes:
        servers: the configured servers (not part of equality).
        name: the configured server name.
        study_instance_uid: Study Instance UID.
        series_instance_uid: Series Instance UID.
    """

    servers: DicomWebServers = field(compare=False, repr=False)
    name: str
    study_instance_uid: str = field(repr=False)
    series_instance_uid: str = field(repr=False)

    #: What stands for a file suffix in the result cache's key.
    suffix = ".dicomweb"

    @property
    def key(self) -> tuple[str, str, str]:
        """``(name, study, series)``."""
        return (self.name, self.study_instance_uid, self.series_instance_uid)

    def open(self) -> DicomSlide:
        """Open the series (pooled) as a :class:`DicomSlide`; closing it gives it back.

        Raises:
            As :meth:`DicomWebServers.open_series`.
        """
        series = self.servers.acquire(self.key)
        return DicomSlide(series, on_close=self.servers.release)

    def fingerprint(self) -> str:
        """What identifies the pixels for the result cache: the server name, the
        study and series UIDs and a SHA-256 of the series' instance UIDs and level-0
        attributes (``dicom:`` + 64 hex digits).

        Raises:
            As :meth:`open`.
        """
        import hashlib

        slide = self.open()
        try:
            digest = slide.series.fingerprint
        finally:
            slide.close()
        parts = (self.name, self.study_instance_uid, self.series_instance_uid, digest)
        return "dicom:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


#: Largest instance StoreDicom accepts (bytes; the proto's limit).
MAX_INSTANCE_BYTES = 256 * 1024 * 1024
#: Most bytes of one StoreDicom call (all its instances; held in memory until sent).
MAX_STORE_BYTES = 1024 * 1024 * 1024
#: Largest chunk of a StoreDicom stream (bytes).
MAX_STORE_CHUNK_BYTES = 1024 * 1024


class InstanceCollector:
    """The instances of one StoreDicom stream: ``instance_size_bytes`` starts one,
    ``chunk`` messages fill it, in order.

    Raises (from :meth:`add` and :meth:`datasets`):
        DicomInvalidError: a chunk before any size, a size out of range, an instance
            longer or shorter than announced, more than :data:`MAX_STORE_BYTES` in all,
            no instance, or bytes that are not a DICOM Part 10 file with SOP Class and
            SOP Instance UIDs.
    """

    def __init__(self) -> None:
        self._done: list[bytes] = []
        self._current: bytearray | None = None
        self._expected = 0
        self._total = 0

    def add(self, part: str | None, msg: Any) -> None:
        """Take one StoreDicomRequest after the first (``part``: its oneof's name)."""
        from histohelper.errors import DicomInvalidError

        if part == "instance_size_bytes":
            self._finish()
            size = int(msg.instance_size_bytes)
            if not 0 < size <= MAX_INSTANCE_BYTES:
                raise DicomInvalidError(
                    f"instance_size_bytes must be 1 to {MAX_INSTANCE_BYTES} bytes"
                )
            self._total += size
            if self._total > MAX_STORE_BYTES:
                raise DicomInvalidError(
                    f"one StoreDicom call may send at most {MAX_STORE_BYTES} bytes"
                )
            self._current, self._expected = bytearray(), size
        elif part == "chunk":
            if self._current is None:
                raise DicomInvalidError("a chunk came before instance_size_bytes")
            if not 0 < len(msg.chunk) <= MAX_STORE_CHUNK_BYTES:
                raise DicomInvalidError(f"chunks must hold 1 to {MAX_STORE_CHUNK_BYTES} bytes")
            if len(self._current) + len(msg.chunk) > self._expected:
                raise DicomInvalidError("an instance is longer than its instance_size_bytes")
            self._current += msg.chunk
        else:
            raise DicomInvalidError("only instance_size_bytes and chunks follow the server name")

    def _finish(self) -> None:
        from histohelper.errors import DicomInvalidError

        if self._current is None:
            return
        if len(self._current) != self._expected:
            raise DicomInvalidError("an instance is shorter than its instance_size_bytes")
        self._done.append(bytes(self._current))
        self._current = None

    def datasets(self) -> list[Any]:
        """The instances parsed with pydicom (Part 10, with File Meta Information).

        Returns:
            ``pydicom.Dataset`` per instance, in the order sent.
        """
        import io

        import pydicom

        from histohelper.errors import DicomInvalidError

        self._finish()
        if not self._done:
            raise DicomInvalidError("no DICOM instance was sent")
        out = []
        for i, data in enumerate(self._done):
            try:
                ds = pydicom.dcmread(io.BytesIO(data))  # force=False: Part 10 preamble needed
                uid = str(ds.SOPInstanceUID)
                str(ds.SOPClassUID)
            except Exception as exc:
                why = (
                    "no SOP Class UID or SOP Instance UID"
                    if isinstance(exc, AttributeError | KeyError)
                    else "no Part 10 preamble and File Meta Information, or unreadable"
                )
                raise DicomInvalidError(
                    f"instance {i} is not a DICOM Part 10 file with SOP Class and Instance "
                    f"UIDs ({why})"
                ) from None
            if not uid:
                raise DicomInvalidError(f"instance {i} has an empty SOP Instance UID")
            out.append(ds)
        self._done = []
        return out
