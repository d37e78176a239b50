"""Server configuration: every setting declared once, as a field of :class:`ServerConfig`.

Each field carries a :class:`Setting` in its dataclass metadata (flag and environment
variable stem, unit, help, bounds, deprecated aliases). From these declarations come
``histohelper serve``'s flags (:func:`add_arguments`), the reading of ``HISTOHELPER_*``
environment variables (:func:`config_from`), the validation in ``__post_init__`` and
README's configuration table (:func:`markdown_table`). Flags win over environment
variables, which win over the defaults. Nothing is read at import: the environment is
read only by :func:`config_from`, called from ``main()``.

Regenerate README's table with ``python -m histohelper.server.config --update README.md``
(``make config-table``); ``--markdown`` prints it.
"""

# Fields are declared with setting(), which returns dataclasses.field(...): RUF009
# cannot see that.
# ruff: noqa: RUF009

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from histohelper.server.runtime.registry import backend_names

MIB = 1024 * 1024
GIB = 1024 * MIB
MPX = 1024 * 1024  # one "Mpx" in flags: 2**20 decoded pixels
ENV_PREFIX = "HISTOHELPER_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Setting:
    """How one :class:`ServerConfig` field is set from outside the process.

    Attributes:
        help: one sentence for ``--help`` and README.
        name: stem of the flag and the environment variable (``num_readers`` gives
            ``--num-readers`` and ``HISTOHELPER_NUM_READERS``); empty: the field's name.
        unit: unit of the flag and environment value ("s", "MiB", "Mpx" or "").
        scale: field value = flag value * scale (MiB -> bytes, Mpx -> pixels).
        group: heading under which ``--help`` lists the flag.
        choices: the values a string setting accepts; empty: any.
        minimum, maximum: inclusive bounds, in flag units (None: unbounded).
        above: exclusive lower bound, in flag units (None: none).
        aliases: deprecated stems still accepted as flags and environment variables
            for one release.
        field_name: the field's name (filled in by :func:`settings`, like the rest).
        kind: the field's type without ``None``: bool, int, float, str or Path.
        optional: the field may be None (an empty value, or 0 for numbers, sets None).
        default: the field's default, in field units.
        required: the field has no default.
        repeatable: a string flag that may be given several times; the values are
            joined with commas (the environment variable takes them comma-separated).
    """

    help: str
    name: str = ""
    unit: str = ""
    scale: int = 1
    group: str = "server"
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    aliases: tuple[str, ...] = ()
    field_name: str = ""
    kind: type = str
    optional: bool = False
    default: Any = None
    required: bool = False
    repeatable: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--num-readers``."""
        return _flag(self.name)

    @property
    def env(self) -> str:
        """The environment variable, e.g. ``HISTOHELPER_NUM_READERS``."""
        return _env(self.name)

    def parse(self, text: str) -> Any:
        """Convert a flag or environment value (flag units) to the field's value.

        Raises:
            ValueError: the text is not a value of this setting.
        """
        text = text.strip()
        if self.optional and text == "":
            return None
        if self.kind is bool:
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError(f"expected 1/0, true/false, yes/no or on/off, not {text!r}")
            return text.lower() in _TRUE
        if self.kind in (int, float):
            try:
                number = float(text) if self.kind is float or self.scale != 1 else int(text)
            except ValueError:
                raise ValueError(f"expected a number, not {text!r}") from None
            if not math.isfinite(number):
                raise ValueError(f"expected a finite number, not {text!r}")
            value = self.kind(number * self.scale)
            return None if self.optional and value == 0 else value
        if self.choices and text not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, not {text!r}")
        return self.kind(text)

    def show(self, value: Any) -> str:
        """Format a field value in flag units (for help, README and error messages)."""
        if value is None:
            return "—"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, int | float):
            number = value / self.scale
            if number != int(number):
                return f"{number:g}"
            return f"{int(number):,}" if number >= 1_000_000 else str(int(number))
        return str(value)


def setting(default: Any = MISSING, **kwargs: Any) -> Any:
    """A dataclass field declaring its :class:`Setting` (keyword arguments as there)."""
    return field(default=default, metadata={"setting": Setting(**kwargs)})


_TLS = "transport security and authentication"
_LIMITS = "limits"
_UPLOADS = "uploads"
_CACHE = "result cache"
_METRICS = "metrics"
_DICOMWEB = "slides in a PACS (DICOMweb)"
_MODELS = "model repository"


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to run; each field's help is its documentation.

    Byte and pixel budgets are held in bytes and pixels (flags take MiB and Mpx).
    ``python -m histohelper.server.config --markdown`` lists every field with its flag,
    environment variable, unit and default.

    Raises:
        ValueError: a value out of its bounds or settings that do not go together; the
            message names the flag.
    """

    slide_root: Path = setting(
        help="directory that request slide paths are relative to; nothing outside it is readable"
    )
    model_path: Path | None = setting(
        None,
        name="model",
        help="exported model artifact (histohelper export), served as a one-model repository; "
        "this or --model-repository is required",
    )
    model_repository: Path | None = setting(
        None,
        group=_MODELS,
        help="model repository: one folder per model name, one sub-folder or .pt file per "
        "version (README: Model repository); instead of --model",
    )
    version_policy: str = setting(
        "latest:1",
        group=_MODELS,
        help="versions served of each model without its own model.json policy: latest:N, "
        "all, or specific:V1,V2",
    )
    default_model: str = setting(
        "",
        group=_MODELS,
        help="model name that serves requests naming none (empty: the only, or first by "
        "name, model)",
    )
    repository_poll_s: float = setting(
        0.0,
        unit="s",
        minimum=0,
        group=_MODELS,
        help="rescan the repository this often (new versions are loaded and warmed before "
        "they take traffic; SIGHUP rescans too); 0: only on SIGHUP or RescanRepository",
    )
    max_loaded_models: int = setting(
        0,
        minimum=0,
        group=_MODELS,
        help="most model versions loaded at once; the least recently used one without "
        "calls in flight is unloaded first (0: no bound)",
    )
    allow_anonymous_admin: bool = setting(
        False,
        group=_MODELS,
        help="let callers without a token or client certificate use ModelAdminService "
        "(without it they get PERMISSION_DENIED; a loopback development server only)",
    )
    host: str = setting("127.0.0.1", help="interface to bind (0.0.0.0 in containers)")
    port: int = setting(50051, minimum=0, maximum=65535, help="TCP port; 0 picks a free one")
    device: str = setting("auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps")
    precision: str = setting(
        "auto",
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        help="model precision; auto picks the fastest variant that passed the export's "
        "parity gate on this device (int8: ONNX backends only; OpenVINO int8 reports "
        "int8+bf16 when its unquantised layers run in bf16)",
    )
    backend: str = setting(
        "auto",
        choices=("auto", *backend_names()),
        help="model runtime (onnx: ONNX Runtime); auto serves the artifact's int8 ONNX model "
        "on CPUs with VNNI when it passed its gate, with OpenVINO where installed and gated, "
        "else ONNX Runtime; otherwise TorchScript (see benchmarks/RESULTS.md)",
    )
    batch_size: int = setting(32, minimum=1, help="default patches per model batch")
    num_readers: int = setting(
        2, minimum=1, aliases=("readers",), help="slide-reader threads per analysis"
    )
    max_concurrent_analyses: int = setting(
        2,
        minimum=1,
        aliases=("max_concurrent",),
        help="AnalyzeSlide calls in flight; one more gets RESOURCE_EXHAUSTED (SERVER_BUSY) at once",
    )
    mask_min_um_per_px: float = setting(
        0.0,
        unit="um/px",
        minimum=0,
        maximum=1000,
        help="tissue masks no finer than this (0: a 1,024 px mask whatever the slide's size); "
        "8 spares small biopsies a full level-0 decode (benchmarks/cohort_bench.py)",
    )
    fluorescence: str = setting(
        "refuse",
        choices=("refuse", "read"),
        help="fluorescence/multiplex slides (QPTIFF, OME channels, greyscale channel pages): "
        "refuse is SLIDE_UNSUPPORTED; read analyses the first channel as grey, tissue = "
        "brighter than the background, with a QC warning that the model is out of domain",
    )
    stain_reference: Path | None = setting(
        None,
        help="reference image (PNG/JPEG/TIFF of typical H&E) whose stain statistics are the "
        "target of STAIN_REFERENCE_SERVER (and of an unspecified reference); unset: none",
    )
    max_patches_per_slide: int = setting(
        1_000_000,
        minimum=1,
        aliases=("max_patches",),
        help="slides with more tissue patches are refused (SLIDE_TOO_LARGE)",
    )
    max_failed_fraction: float = setting(
        0.05,
        minimum=0,
        maximum=1,
        help="share of a slide's patches that may fail to read before it fails (DATA_LOSS)",
    )
    num_threads: int | None = setting(
        None,
        minimum=1,
        aliases=("threads",),
        help="torch intra-op threads (unset or 0: the runtime's choice)",
    )
    drain_s: float = setting(
        0.0,
        unit="s",
        minimum=0,
        help="after SIGTERM, health says NOT_SERVING while new calls are still accepted, so "
        "load balancers and readiness probes move traffic before the port closes",
    )
    grace_s: float = setting(
        10.0, unit="s", minimum=0, help="after --drain-s, in-flight calls get this long to finish"
    )
    ready_file: Path | None = setting(
        None,
        help="write {host, port, pid} as JSON here once serving (for scripts using --port 0)",
    )
    health_port: int | None = setting(
        None,
        minimum=1,
        maximum=65535,
        help="also serve grpc.health.v1 alone, in plaintext, on --health-host at this port, "
        "for container probes when the main port needs TLS or tokens (unset or 0: off)",
    )
    health_host: str = setting(
        "127.0.0.1",
        help="interface of --health-port; 0.0.0.0 where the prober is outside the container "
        "(a kubelet's grpc probe dials the pod's address); it serves health status only",
    )
    log_level: str = setting(
        "INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="level of the JSON-lines logs on stderr",
    )
    tls_cert: Path | None = setting(
        None,
        group=_TLS,
        help="PEM certificate chain of the server; with --tls-key the port speaks TLS only",
    )
    tls_key: Path | None = setting(None, group=_TLS, help="PEM private key of the server")
    tls_client_ca: Path | None = setting(
        None,
        group=_TLS,
        help="PEM CA bundle: clients must present a certificate it signed (mutual TLS); its "
        "subject CN becomes the caller identity",
    )
    tokens_file: Path | None = setting(
        None,
        group=_TLS,
        help="JSON file of accepted bearer-token SHA-256 hashes with identities and roles; when "
        "set, every call but health and reflection needs 'authorization: Bearer <token>'",
    )
    allow_insecure: bool = setting(
        False,
        group=_TLS,
        aliases=("insecure",),
        help="allow plaintext on a non-loopback --host (e.g. behind a TLS-terminating "
        "sidecar); plaintext is otherwise served only on loopback",
    )
    audit_log: Path | None = setting(
        None,
        group=_TLS,
        help="append JSON-lines audit records (mode 0600) here (unset: the histohelper.audit "
        "logger on stderr)",
    )
    upload_dir: Path | None = setting(
        None,
        group=_UPLOADS,
        help="upload area (unset: a private temporary directory, removed on stop)",
    )
    upload_max_bytes: int = setting(
        4 * GIB,
        name="upload_max_mib",
        unit="MiB",
        scale=MIB,
        above=0,
        group=_UPLOADS,
        help="largest single upload (SLIDE_TOO_LARGE beyond it)",
    )
    upload_quota_bytes: int = setting(
        16 * GIB,
        name="upload_quota_mib",
        unit="MiB",
        scale=MIB,
        above=0,
        group=_UPLOADS,
        help="all stored and in-flight uploads together",
    )
    upload_ttl_s: float = setting(
        3600.0,
        unit="s",
        above=0,
        group=_UPLOADS,
        help="an upload lives this long after its last use",
    )
    max_concurrent_uploads: int = setting(
        4, minimum=1, group=_UPLOADS, help="UploadSlide calls in flight"
    )
    cache_dir: Path | None = setting(
        None,
        group=_CACHE,
        help="result cache of AnalyzeSlide: a repeated request (same slide content, model "
        "and options) replays the stored event stream; may be shared by replicas (unset: off)",
    )
    cache_max_bytes: int = setting(
        20 * GIB,
        name="cache_max_gib",
        unit="GiB",
        scale=GIB,
        above=0,
        group=_CACHE,
        help="bound on the result cache's entries; the least recently used go first",
    )
    max_classify_streams: int = setting(
        4,
        minimum=1,
        group=_LIMITS,
        help="ClassifyPatches streams open at once; one more gets RESOURCE_EXHAUSTED at once",
    )
    default_deadline_s: float = setting(
        3600.0,
        unit="s",
        minimum=0,
        group=_LIMITS,
        help="deadline of analyses and uploads whose client set none (DEADLINE_EXCEEDED "
        "after it); 0 disables",
    )
    stalled_stream_s: float = setting(
        30.0,
        unit="s",
        minimum=0,
        group=_LIMITS,
        help="a streaming call whose client has neither taken nor sent a message for this "
        "long is ended (STREAM_STALLED) and frees its slot; 0 disables",
    )
    max_images_per_request: int = setting(
        1024, minimum=1, group=_LIMITS, help="images per ClassifyPatches request"
    )
    classify_request_max_px: int = setting(
        128 * MPX,
        name="classify_request_max_mpx",
        unit="Mpx",
        scale=MPX,
        above=0,
        group=_LIMITS,
        help="decoded pixels one ClassifyPatches request may cost, read from the image headers "
        "before decoding (RESOURCE_EXHAUSTED beyond it; 1 Mpx = 2^20 px)",
    )
    classify_stream_max_px: int = setting(
        4096 * MPX,
        name="classify_stream_max_mpx",
        unit="Mpx",
        scale=MPX,
        above=0,
        group=_LIMITS,
        help="decoded pixels one ClassifyPatches stream may cost in all its requests together",
    )
    roi_max_vertices: int = setting(
        100_000,
        minimum=3,
        group=_LIMITS,
        help="vertices a request's region of interest (AnalysisOptions.roi GeoJSON, include "
        "and exclude together) may have; more is refused (INVALID_OPTIONS). Validity checks "
        "cost up to about 2 s per 100,000 vertices",
    )
    roi_max_bytes: int = setting(
        8 * MIB,
        name="roi_max_mib",
        unit="MiB",
        scale=MIB,
        above=0,
        group=_LIMITS,
        help="bytes of a request's region of interest (GeoJSON text and mask PNG together); "
        "more is refused (INVALID_OPTIONS)",
    )
    max_message_bytes: int = setting(
        16 * MIB,
        name="max_message_mib",
        unit="MiB",
        scale=MIB,
        above=0,
        group=_LIMITS,
        help="largest gRPC message, either way",
    )
    keepalive_time_s: float = setting(
        60.0, unit="s", above=0, group=_LIMITS, help="HTTP/2 keepalive ping interval"
    )
    keepalive_timeout_s: float = setting(
        20.0,
        unit="s",
        above=0,
        group=_LIMITS,
        help="a connection whose keepalive ping is not acknowledged within this is dropped",
    )
    max_connection_age_s: float = setting(
        300.0,
        unit="s",
        minimum=0,
        group=_LIMITS,
        help="a connection gets GOAWAY after this long; clients reconnect by themselves, "
        "resolving the name again, so that with several replicas behind one DNS name (a "
        "headless Service) they find new replicas within minutes, not hours; calls in flight "
        "finish on the old connection (--max-connection-age-grace-s); 0 disables",
    )
    max_connection_age_grace_s: float = setting(
        3600.0,
        unit="s",
        minimum=0,
        group=_LIMITS,
        help="calls still in flight on a connection past --max-connection-age-s get this long "
        "to finish before it is closed (UNAVAILABLE); keep it above your longest analysis",
    )
    metrics_port: int = setting(
        0,
        minimum=0,
        maximum=65535,
        group=_METRICS,
        help="serve Prometheus metrics (text format, plain HTTP) on this port; 0: off",
    )
    metrics_host: str = setting(
        "127.0.0.1",
        group=_METRICS,
        help="interface of the metrics port (a non-loopback one is logged as a warning)",
    )
    dicomweb: str = setting(
        "",
        group=_DICOMWEB,
        repeatable=True,
        help="DICOMweb servers (PACS) that requests may name: NAME=URL, the flag repeated "
        "or comma-separated; no other server is ever contacted (empty: none)",
    )
    dicomweb_secrets_dir: Path | None = setting(
        None,
        group=_DICOMWEB,
        help="folder of per-server credentials: NAME.token (bearer token), NAME.basic "
        "(user:password), NAME.ca.pem (CA bundle); never logged",
    )
    dicomweb_timeout_s: float = setting(
        30.0,
        unit="s",
        above=0,
        group=_DICOMWEB,
        help="timeout of each HTTP request to a DICOMweb server (PACS_UNAVAILABLE past it)",
    )
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in settings():
            _check_bounds(s, getattr(self, s.field_name))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.upload_max_bytes > self.upload_quota_bytes:
            raise ValueError("--upload-max-mib must be <= --upload-quota-mib")
        if self.model_path is None and self.model_repository is None:
            raise ValueError("--model (or HISTOHELPER_MODEL) is required, or --model-repository")
        if self.model_path is not None and self.model_repository is not None:
            raise ValueError("--model and --model-repository exclude each other")
        from histohelper.server.repository import VersionPolicy  # stdlib-only module

        try:
            VersionPolicy.parse(self.version_policy)
        except ValueError as exc:
            raise ValueError(f"--version-policy: {exc}") from None

    @property
    def tls(self) -> bool:
        """True when the port speaks TLS."""
        return self.tls_cert is not None


def _flag(stem: str) -> str:
    return "--" + stem.replace("_", "-")


def _env(stem: str) -> str:
    return ENV_PREFIX + stem.upper()


def _check_bounds(s: Setting, value: Any) -> None:
    if value is None or s.kind not in (int, float):
        return
    shown = value / s.scale
    unit = f" {s.unit}" if s.unit else ""
    if s.minimum is not None and shown < s.minimum:
        raise ValueError(f"{s.flag} must be >= {s.minimum:g}{unit} (got {s.show(value)})")
    if s.maximum is not None and shown > s.maximum:
        raise ValueError(f"{s.flag} must be <= {s.maximum:g}{unit} (got {s.show(value)})")
    if s.above is not None and shown <= s.above:
        raise ValueError(f"{s.flag} must be > {s.above:g}{unit} (got {s.show(value)})")


@functools.cache
def settings() -> tuple[Setting, ...]:
    """Every declared setting, in field order, with field name, kind and default filled in."""
    hints = get_type_hints(ServerConfig)
    out = []
    for f in fields(ServerConfig):
        if "setting" not in f.metadata:
            continue
        kind, optional = hints[f.name], False
        if get_origin(kind) in (Union, types.UnionType):
            (kind,) = [a for a in get_args(kind) if a is not type(None)]
            optional = True
        declared: Setting = f.metadata["setting"]
        out.append(
            replace(
                declared,
                name=declared.name or f.name,
                field_name=f.name,
                kind=kind,
                optional=optional,
                default=None if f.default is MISSING else f.default,
                required=f.default is MISSING,
            )
        )
    return tuple(out)


def _help(s: Setting) -> str:
    """``--help`` text: the declaration's help, default and unit, environment variable."""
    default = "required" if s.required else f"default {s.show(s.default)}"
    unit = f" {s.unit}" if s.unit and not s.required and s.default is not None else ""
    text = f"{s.help} ({default}{unit}) [{s.env}]"
    if s.aliases:
        old = ", ".join(f"{_flag(a)} / {_env(a)}" for a in s.aliases)
        text += f"; deprecated alias {old}, removed in the next release"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (plus hidden deprecated aliases) to ``parser``.

    Every default is None ("not given"): :func:`config_from` fills in the environment
    and the declared defaults, so building the parser reads nothing.
    """
    groups: dict[str, Any] = {"server": parser}
    for s in settings():
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(s.group)
        if s.kind is bool:
            how: dict[str, Any] = {"action": "store_const", "const": True}
        else:
            how = {"type": functools.partial(_parse_flag, s), "metavar": _metavar(s)}
            if s.repeatable:
                how["action"] = "append"
        for stem in (s.name, *s.aliases):  # deprecated aliases: hidden, named in the help
            help_text = _help(s) if stem == s.name else argparse.SUPPRESS
            groups[s.group].add_argument(_flag(stem), dest=_dest(s, stem), help=help_text, **how)


def _dest(s: Setting, stem: str) -> str:
    return s.field_name if stem == s.name else f"deprecated_{stem}"


def _metavar(s: Setting) -> str:
    if s.choices:
        return "{" + ",".join(s.choices) + "}"
    units = {"s": "SECONDS", "MiB": "MIB", "GiB": "GIB", "Mpx": "MPX"}
    kinds = {int: "N", float: "X", Path: "PATH"}
    return units.get(s.unit) or kinds.get(s.kind) or s.name.upper()


def _parse_flag(s: Setting, text: str) -> Any:
    try:
        return s.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_from(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[ServerConfig, list[str]]:
    """Build the configuration: flags, then environment variables, then defaults.

    Args:
        args: parsed flags of a parser that :func:`add_arguments` built.
        environ: the environment (``os.environ`` in ``main()``).

    Returns:
        The configuration and the deprecated names that were used (flags or variables),
        each as ``"old -> new"``.

    Raises:
        ValueError: an environment value that does not parse (the message names the
            variable), a required setting given nowhere, or a value out of bounds.
    """
    values: dict[str, Any] = {}
    deprecated: list[str] = []
    for s in settings():
        found = _given(s, args, environ)
        if found is None:
            if s.required:
                raise ValueError(f"{s.flag} (or {s.env}) is required")
            continue
        used, values[s.field_name] = found
        if used not in (s.flag, s.env):
            deprecated.append(f"{used} -> {s.flag if used.startswith('--') else s.env}")
    return ServerConfig(**values), deprecated


def _given(
    s: Setting, args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[str, Any] | None:
    """``(name, value)`` of the first of the setting's flags, then of its environment
    variables, that is set (new name before deprecated ones); None if none is."""
    for stem in (s.name, *s.aliases):
        value = getattr(args, _dest(s, stem), None)
        if isinstance(value, list):  # a repeatable flag given several times
            value = ",".join(value)
        if value is not None:
            return _flag(stem), value
    for stem in (s.name, *s.aliases):
        text = environ.get(_env(stem))
        if text is not None:
            try:
                return _env(stem), s.parse(text)
            except ValueError as exc:
                raise ValueError(f"{_env(stem)}: {exc}") from None
    return None


# --- README table ----------------------------------------------------------------------

TABLE_BEGIN = "<!-- config-table:begin (generated: python -m histohelper.server.config) -->"
TABLE_END = "<!-- config-table:end -->"


def markdown_table() -> str:
    """README's configuration table, one row per setting (ends with a newline)."""
    rows = ["| flag | env | unit | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for s in settings():
        meaning = s.help
        if s.choices:
            meaning += "; one of " + ", ".join(f"`{c}`" for c in s.choices)
        if s.aliases:
            old = ", ".join(f"`{_flag(a)}` / `{_env(a)}`" for a in s.aliases)
            meaning += f". Deprecated alias: {old} (removed in the next release)"
        default = "required" if s.required else s.show(s.default)
        cells = [f"`{s.flag}`", f"`{s.env}`", s.unit, default, meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def replace_table(readme: str) -> str:
    """``readme`` with the text between the table markers replaced by :func:`markdown_table`.

    Raises:
        ValueError: the markers are missing.
    """
    pattern = re.compile(re.escape(TABLE_BEGIN) + r"\n.*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(readme):
        raise ValueError("README has no configuration table markers")
    block = f"{TABLE_BEGIN}\n{markdown_table()}{TABLE_END}"
    return pattern.sub(lambda _: block, readme)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m histohelper.server.config``: print or update README's table."""
    p = argparse.ArgumentParser(prog="python -m histohelper.server.config")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--markdown", action="store_true", help="print the table")
    how.add_argument("--update", type=Path, metavar="README", help="rewrite the table there")
    args = p.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
    else:
        args.update.write_text(replace_table(args.update.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
