"""Naming a model of the server's repository, listing the repository, administering it.

A server started with ``serve --model-repository DIR`` serves several models and
versions; every model-serving call may name one (``model="tumour"``,
``model="tumour:3"`` or :class:`ModelRef`); unnamed, the server's default model's
default version serves. Results name the version that served them
(:attr:`SlideResult.model <histohelper.client.result.SlideResult.model>`).

:class:`ModelAdmin` (from :meth:`SlideClient.admin
<histohelper.client.sync.SlideClient.admin>`) calls ``ModelAdminService``: load,
unload, set a default, rescan; the caller needs the ``admin`` role.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from histohelper.client.errors import error_from_rpc
from histohelper.client.events import ModelSummary
from histohelper.v1 import model_admin_pb2 as admin_pb
from histohelper.v1 import model_admin_pb2_grpc as admin_grpc
from histohelper.v1 import slide_analysis_pb2 as pb

_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model of the server's repository: name and version (empty: the defaults)."""

    name: str = ""
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``"NAME"`` or ``"NAME:VERSION"`` (``""``: the server's default).

        Raises:
            ValueError: not of that form.
        """
        name, sep, version = text.strip().partition(":")
        if not name and not sep:
            return cls()
        if not _PART.match(name) or (sep and not _PART.match(version)):
            raise ValueError(f"expected NAME or NAME:VERSION, not {text!r}")
        return cls(name, version)

    @classmethod
    def from_proto(cls, msg: pb.ModelRef) -> ModelRef:
        return cls(msg.name, msg.version)

    def to_proto(self) -> pb.ModelRef:
        return pb.ModelRef(name=self.name, version=self.version)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


#: What SDK methods accept as ``model=``.
ModelSpec = str | ModelRef | None


def model_ref(model: ModelSpec) -> ModelRef:
    """``model=`` of an SDK method as a :class:`ModelRef` (None: the defaults).

    Raises:
        ValueError: a string not of the form ``NAME[:VERSION]``.
    """
    if model is None:
        return ModelRef()
    return model if isinstance(model, ModelRef) else ModelRef.parse(model)


@dataclass(frozen=True, slots=True)
class RepositoryModel:
    """One version of the server's repository (``GetModelInfo``, admin answers).

    Attributes:
        model: name and version; the rest of the summary once the version is loaded.
        state: ``"loaded"``, ``"available"`` (loaded on first use) or ``"failed"``.
        default_version: the default version of its model name.
        default_model: its model name is the server's default.
        error: why a failed version was refused.
    """

    model: ModelSummary
    state: str
    default_version: bool = False
    default_model: bool = False
    error: str = ""
    manifest_json: str = field(default="", repr=False)

    @classmethod
    def from_proto(cls, msg: pb.RepositoryModel) -> RepositoryModel:
        return cls(
            ModelSummary.from_proto(msg.model),
            msg.state,
            msg.default_version,
            msg.default_model,
            msg.error,
            msg.manifest_json,
        )

    @property
    def ref(self) -> ModelRef:
        """Its name and version."""
        return ModelRef(self.model.name, self.model.version)


class ModelAdmin:
    """Calls of ``histohelper.v1.ModelAdminService`` over a client's channel.

    Every method returns the repository after the change and raises a
    :class:`~histohelper.errors.HistoHelperError` subclass on failure:
    ``PermissionDeniedError`` (no ``admin`` role), ``ModelNotFoundError``,
    ``ModelLoadError`` (the version failed to load; the old state serves),
    ``ModelInUseError`` (calls in flight, or no room under ``--max-loaded-models``).

    Args:
        channel: the client's gRPC channel.
        metadata: call metadata (the bearer token).
        timeout: deadline of each call in seconds (a load warms a model up).
    """

    def __init__(self, channel: grpc.Channel, metadata: Any, timeout: float) -> None:
        self._stub = admin_grpc.ModelAdminServiceStub(channel)
        self._metadata = metadata
        self.timeout = timeout

    def _call(self, method: str, request: Any) -> list[RepositoryModel]:
        try:
            reply = getattr(self._stub, method)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return listing(reply.models)

    def load(self, model: ModelSpec) -> list[RepositoryModel]:
        """Load (and warm) a version so it takes traffic without a first-use load."""
        return self._call("LoadModel", admin_pb.LoadModelRequest(model=model_ref(model).to_proto()))

    def unload(self, model: ModelSpec) -> list[RepositoryModel]:
        """Unload a version (``NAME:VERSION``); it loads again on first use."""
        request = admin_pb.UnloadModelRequest(model=model_ref(model).to_proto())
        return self._call("UnloadModel", request)

    def set_default(
        self, model: ModelSpec, *, server_default: bool = False
    ) -> list[RepositoryModel]:
        """Make ``NAME:VERSION`` its model's default (and the server's default model)."""
        request = admin_pb.SetDefaultModelRequest(
            model=model_ref(model).to_proto(), server_default=server_default
        )
        return self._call("SetDefaultModel", request)

    def rescan(self) -> list[RepositoryModel]:
        """Rescan the server's repository now (as its poll or SIGHUP would)."""
        return self._call("RescanRepository", admin_pb.RescanRepositoryRequest())


def parse_model_arg(text: str) -> str:
    """argparse ``type`` of ``--model``: ``NAME[:VERSION]`` checked, returned as given.

    Raises:
        argparse.ArgumentTypeError: not of that form.
    """
    try:
        return str(ModelRef.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_argument(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """``--model NAME[:VERSION]`` (with ``several``: repeatable, a list) on a command."""
    help_text = (
        "model of the server's repository (serve --model-repository), NAME or NAME:VERSION "
        "(default: the server's default model and version)"
    )
    if several:
        help_text += "; repeat it to analyse each slide with every model, side by side"
    parser.add_argument(
        "--model",
        type=parse_model_arg,
        action="append" if several else "store",
        metavar="NAME[:VERSION]",
        help=help_text,
    )


def listing(models: Sequence[pb.RepositoryModel]) -> list[RepositoryModel]:
    """The repository's versions as :class:`RepositoryModel` items."""
    return [RepositoryModel.from_proto(m) for m in models]


def format_listing(models: Sequence[RepositoryModel]) -> str:
    """A text table of the repository: model, version, state, defaults, error."""
    lines = []
    for m in models:
        flags = ("default" if m.default_version else "") + (
            " (server default)" if m.default_model and m.default_version else ""
        )
        line = f"{m.model.name:<24} {m.model.version:<12} {m.state:<10} {flags}".rstrip()
        lines.append(line + (f"  error: {m.error}" if m.error else ""))
    return "\n".join(lines)
