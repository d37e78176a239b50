"""A real Orthanc PACS with its DICOMweb plugin, for tests (a pytest plugin).

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed by
``.ci/run``) runs as a plain child process on a free loopback port with a generated
configuration and a temporary storage folder. Orthanc 1.10 ignores its bind address,
so ``RemoteAccessAllowed: false`` is what keeps a test instance to loopback clients;
its DICOM (DIMSE) listener is off, so parallel test runs never clash on port 4242.

Fixtures:
    ``orthanc``: session-wide Orthanc without authentication -> :class:`Orthanc`.
    ``orthanc_auth``: session-wide Orthanc with HTTP basic authentication
        (``RegisteredUsers``), for 401 tests -> :class:`Orthanc` (``username``/``password`` set).
    ``dicomweb_dicom_dir``: the real slide ``CMU-1-Small-Region.svs`` converted to DICOM
        WSI with wsidicomizer once per session (JPEG tiles copied, not re-encoded;
        one level, no label/overview/thumbnail) -> folder of ``.dcm`` instances.
    ``dicomweb_slide``: that series stored in ``orthanc`` with STOW-RS -> :class:`DicomWebSlide`.

Helpers: :func:`start_orthanc` (a context manager for other configurations: HTTP basic
authentication, HTTPS with a given certificate, a bearer-token check by a Python plugin),
:func:`stow` (store pydicom datasets or files), :func:`store_with_broken_frames` (the
slide again as a series with undecodable frames), :func:`store_as_fluorescence` (again,
as an epifluorescence series), :func:`free_port`.

HTTPS: Debian's Orthanc 1.10 crashes (SIGSEGV in a civetweb worker, a null function
pointer: civetweb's TLS binding over OpenSSL 3) on the first request it serves with
``SslEnabled``, RSA or EC certificate alike (seen 2026-12-03), so TLS is terminated by
stunnel (Debian ``stunnel4``) in front of the plain-HTTP loopback Orthanc, as a PACS
behind a TLS proxy is deployed.

Tests skip only when the ``Orthanc`` binary or the DICOMweb plugin (or, for a bearer
token, the ``orthanc-python`` plugin; for HTTPS, ``stunnel``) is not installed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Where Debian's orthanc-dicomweb puts the plugin (``dpkg -L orthanc-dicomweb``).
DICOMWEB_PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so.1.7"),
)
#: Where Debian's orthanc-python puts the Python plugin (``dpkg -L orthanc-python``).
PYTHON_PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancPython.so"),
    Path("/usr/lib/orthanc/libOrthancPython.so.4.0"),
)
#: The Python plugin script of an Orthanc started with ``bearer_token``: every HTTP
#: request without ``Authorization: Bearer <the configured token>`` gets 403 (Orthanc
#: answers 403 when an incoming-request filter returns False).
BEARER_FILTER_SCRIPT = """\
import json

import orthanc

EXPECTED = "Bearer " + json.loads(orthanc.GetConfiguration())["HistoHelperTestBearerToken"]


def accept(uri, **request):
    return request.get("headers", {}).get("authorization") == EXPECTED


orthanc.RegisterIncomingHttpRequestFilter(accept)
"""
READY_TIMEOUT_S = 60.0
#: The DICOMweb server name tests configure on HistoHelper (``serve --dicomweb pacs=URL``).
PACS_NAME = "pacs"


def orthanc_binary() -> str | None:
    """Path of the ``Orthanc`` executable, or None when it is not installed."""
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None
    )


def dicomweb_plugin() -> Path | None:
    """Path of the DICOMweb plugin library, or None when it is not installed."""
    return next((p for p in DICOMWEB_PLUGIN_PATHS if p.is_file()), None)


def require_orthanc() -> tuple[str, Path]:
    """``(binary, plugin)``, or skip the test when either is not installed."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None or plugin is None:
        pytest.skip(
            "Orthanc with its DICOMweb plugin is not installed "
            "(apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
        )
    return binary, plugin


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc.

    Attributes:
        base_url: ``http://127.0.0.1:PORT`` (Orthanc's REST API).
        dicomweb_url: ``base_url + "/dicom-web"`` (QIDO/WADO/STOW-RS root).
        storage_dir: Orthanc's storage and index folder.
        port: the HTTP port.
        process: the child process.
        log_path: Orthanc's stdout/stderr.
        username: basic-auth user when authentication is on, else None.
        password: its password, else None.
        bearer_token: the only token accepted (``Authorization: Bearer ...``), else None.
        ca_bundle: CA certificate that verifies the HTTPS certificate, else None.
    """

    base_url: str
    dicomweb_url: str
    storage_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    username: str | None = None
    password: str | None = None
    bearer_token: str | None = None
    ca_bundle: Path | None = None

    def session(self) -> Any:
        """A ``requests.Session`` carrying this Orthanc's credentials and CA (if any)."""
        import requests

        session = requests.Session()
        if self.username is not None:
            session.auth = (self.username, self.password or "")
        if self.bearer_token is not None:
            session.headers["Authorization"] = f"Bearer {self.bearer_token}"
        if self.ca_bundle is not None:
            session.verify = str(self.ca_bundle)
            session.trust_env = False  # else REQUESTS_CA_BUNDLE wins (psf/requests#4650)
        return session

    def client(self) -> Any:
        """A :class:`dicomweb_client.DICOMwebClient` for this Orthanc."""
        from dicomweb_client import DICOMwebClient

        return DICOMwebClient(self.dicomweb_url, session=self.session())

    def serve_flag(self, name: str = PACS_NAME) -> list[str]:
        """``["--dicomweb", "NAME=URL"]`` for ``histohelper serve``."""
        return ["--dicomweb", f"{name}={self.dicomweb_url}"]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _config(
    workdir: Path,
    port: int,
    plugin: Path,
    users: dict[str, str] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "histohelper-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        # Orthanc 1.10 ignores its bind address: refusing remote clients is what
        # keeps this instance to loopback.
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": False,
        "AuthenticationEnabled": users is not None,
        "RegisteredUsers": users or {},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StorageCompression": False,
        "HttpThreadsCount": 16,
        "KeepAlive": True,
        "SaveJobs": False,
        "StableAge": 1,
    }
    for key, value in (extra or {}).items():
        config[key] = [*config[key], *value] if key == "Plugins" else value
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _token_settings(workdir: Path, bearer_token: str | None) -> dict[str, Any]:
    """Orthanc settings for the bearer-token filter (none without a token)."""
    extra: dict[str, Any] = {}
    if bearer_token is not None:
        python_plugin = next((p for p in PYTHON_PLUGIN_PATHS if p.is_file()), None)
        if python_plugin is None:
            pytest.skip(
                "Orthanc's Python plugin is not installed (apt-get install orthanc-python; "
                ".ci/run does it)"
            )
        script = workdir / "bearer_filter.py"
        script.write_text(BEARER_FILTER_SCRIPT)
        extra |= {
            "Plugins": [str(python_plugin)],
            "PythonScript": str(script),
            "HistoHelperTestBearerToken": bearer_token,
        }
    return extra


@contextlib.contextmanager
def start_orthanc(
    workdir: Path,
    users: dict[str, str] | None = None,
    *,
    certificate: Path | None = None,
    ca_bundle: Path | None = None,
    bearer_token: str | None = None,
) -> Iterator[Orthanc]:
    """Run Orthanc on a free loopback port until the ``with`` block ends.

    Args:
        workdir: empty folder for the configuration, storage and log.
        users: ``{username: password}`` to turn HTTP basic authentication on.
        certificate: PEM file holding the server certificate and its private key:
            the server is reached over HTTPS only, through :func:`tls_proxy`.
        ca_bundle: the CA that signed ``certificate`` (the readiness check and
            :meth:`Orthanc.session` verify with it).
        bearer_token: serve only requests carrying ``Authorization: Bearer
            <bearer_token>`` (403 otherwise), checked by :data:`BEARER_FILTER_SCRIPT`
            in Orthanc's Python plugin.

    Yields:
        :class:`Orthanc`, ready (its ``/system`` answered).

    Raises:
        RuntimeError: Orthanc exited or did not answer within :data:`READY_TIMEOUT_S`.
        pytest.skip.Exception: Orthanc or its DICOMweb plugin (or, with
            ``bearer_token``, its Python plugin; with ``certificate``, stunnel) is not
            installed.
    """
    import requests

    binary, plugin = require_orthanc()
    port = free_port()
    extra = _token_settings(workdir, bearer_token)
    config = _config(workdir, port, plugin, users, extra)
    log_path = workdir / "orthanc.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [binary, str(config)], stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir
        )
    stack = contextlib.ExitStack()
    base = f"http://127.0.0.1:{port}"
    if certificate is not None:
        base = f"https://127.0.0.1:{stack.enter_context(tls_proxy(workdir, certificate, port))}"
    user = next(iter(users.items())) if users else None
    server = Orthanc(
        base, base + "/dicom-web", workdir / "storage", port, proc, log_path,
        user[0] if user else None, user[1] if user else None, bearer_token, ca_bundle,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with server.session() as session:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"Orthanc exited early:\n{server.log_text()[-4000:]}")
                try:
                    if session.get(base + "/system", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc not ready:\n{server.log_text()[-4000:]}")
                time.sleep(0.1)
        yield server
    finally:
        stack.close()
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child process (kill it after 15 s) and reap it."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def tls_proxy(workdir: Path, certificate: Path, target_port: int) -> Iterator[int]:
    """stunnel serving TLS on a free loopback port, forwarding to ``target_port``.

    Args:
        workdir: folder for stunnel's configuration and log.
        certificate: PEM file with the server certificate and its private key.
        target_port: the plain-HTTP loopback port behind it.

    Yields:
        The TLS port (accepting connections).

    Raises:
        pytest.skip.Exception: stunnel is not installed.
        RuntimeError: stunnel exited or did not listen within :data:`READY_TIMEOUT_S`.
    """
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        pytest.skip("stunnel is not installed (apt-get install stunnel4; .ci/run does it)")
    port = free_port()
    config = workdir / "stunnel.conf"
    log_path = workdir / "stunnel.log"
    config.write_text(
        f"foreground = yes\npid =\noutput = {log_path}\n\n[orthanc]\n"
        f"accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{target_port}\ncert = {certificate}\n"
    )
    proc = subprocess.Popen(
        [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log = log_path.read_text(errors="replace") if log_path.exists() else ""
                raise RuntimeError(f"stunnel exited early:\n{log[-4000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("stunnel did not listen")
            time.sleep(0.05)
        yield port
    finally:
        _stop(proc)


def stow(server: Orthanc, instances: Iterable[Any]) -> None:
    """Store instances in ``server`` with STOW-RS.

    Args:
        server: the Orthanc.
        instances: pydicom ``Dataset`` objects or paths of DICOM Part 10 files.
    """
    import pydicom

    datasets = [
        item if isinstance(item, pydicom.Dataset) else pydicom.dcmread(item) for item in instances
    ]
    server.client().store_instances(datasets)


@dataclass(frozen=True)
class DicomWebSlide:
    """A DICOM WSI series stored in a test Orthanc.

    Attributes:
        server: the Orthanc holding it.
        name: the DICOMweb server name to configure on HistoHelper (:data:`PACS_NAME`).
        study_instance_uid: Study Instance UID.
        series_instance_uid: Series Instance UID.
        dicom_dir: the local folder of the same instances (a local DICOM WSI).
        source_path: the slide file it was converted from.
    """

    server: Orthanc
    name: str
    study_instance_uid: str
    series_instance_uid: str
    dicom_dir: Path
    source_path: Path

    @property
    def uri(self) -> str:
        """``dicomweb://NAME/STUDY_UID/SERIES_UID``."""
        return f"dicomweb://{self.name}/{self.study_instance_uid}/{self.series_instance_uid}"


def convert_to_dicom(source: Path, out_dir: Path) -> list[Path]:
    """Convert a slide file to DICOM WSI instances with wsidicomizer.

    Tiles are copied, not re-encoded, where opentile reads the format (SVS: level 0
    byte-identical); no levels are added; label, overview and thumbnail are left out.

    Returns:
        The written ``.dcm`` files.
    """
    from wsidicomizer import WsiDicomizer

    out_dir.mkdir(parents=True, exist_ok=True)
    files = WsiDicomizer.convert(
        source,
        out_dir,
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
        workers=1,
    )
    return [Path(f) for f in files]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc without authentication on a loopback port, for the whole session."""
    with start_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="session")
def orthanc_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with HTTP basic authentication (user ``histo``), for the whole session."""
    with start_orthanc(
        tmp_path_factory.mktemp("orthanc-auth"), users={"histo": "not-the-real-secret"}
    ) as server:
        yield server


@pytest.fixture(scope="session")
def dicomweb_dicom_dir(real_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``CMU-1-Small-Region.svs`` as DICOM WSI (wsidicomizer, ~3 s), once per session."""
    out = tmp_path_factory.mktemp("dicom-cmu1")
    convert_to_dicom(real_slide, out)
    return out


@pytest.fixture(scope="session")
def dicomweb_slide(orthanc: Orthanc, dicomweb_dicom_dir: Path, real_slide: Path) -> DicomWebSlide:
    """The converted real slide stored in ``orthanc`` with STOW-RS."""
    import pydicom

    files = sorted(dicomweb_dicom_dir.glob("*.dcm"))
    stow(orthanc, files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return DicomWebSlide(
        orthanc,
        PACS_NAME,
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        dicomweb_dicom_dir,
        real_slide,
    )


def store_with_broken_frames(
    dicomweb_slide: DicomWebSlide, broken: Callable[[int], bool]
) -> tuple[str, str]:
    """The converted slide stored again as a new series whose frames ``broken(i)``
    (0-based) are replaced by bytes that are not JPEG; returns (study, series) UIDs."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(next(iter(sorted(dicomweb_slide.dicom_dir.glob("*.dcm")))))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    frames = [b"\xff\xd8 not a jpeg \xff\xd9" if broken(i) else f for i, f in enumerate(frames)]
    ds.PixelData = encapsulate(frames)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    stow(dicomweb_slide.server, [ds])
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def store_as_fluorescence(dicomweb_slide: DicomWebSlide) -> tuple[str, str]:
    """The converted slide stored again as a new series whose optical path says
    epifluorescence illumination (DCM 111743); returns (study, series) UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(next(iter(sorted(dicomweb_slide.dicom_dir.glob("*.dcm")))))
    code = ds.OpticalPathSequence[0].IlluminationTypeCodeSequence[0]
    code.CodeValue, code.CodeMeaning = "111743", "Epifluorescence illumination"
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    stow(dicomweb_slide.server, [ds])
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def store_copy(dicomweb_slide: DicomWebSlide) -> tuple[str, str]:
    """The converted slide's first instance stored again as a new series in a new study
    (so that deleting it touches nothing else); returns (study, series) UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(next(iter(sorted(dicomweb_slide.dicom_dir.glob("*.dcm")))))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    stow(dicomweb_slide.server, [ds])
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def delete_series(server: Orthanc, series_uid: str) -> None:
    """Delete a series from Orthanc through its REST API (found by ``/tools/lookup``)."""
    with server.session() as session:
        found = session.post(f"{server.base_url}/tools/lookup", data=series_uid, timeout=10)
        found.raise_for_status()
        (orthanc_id,) = [item["ID"] for item in found.json() if item["Type"] == "Series"]
        session.delete(f"{server.base_url}/series/{orthanc_id}", timeout=10).raise_for_status()
