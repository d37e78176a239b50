"""The README's grpcurl recipe for the health port: that port has no server reflection,
and the protoset the README's one-liner writes describes grpc.health.v1.Health well
enough to call it (what ``grpcurl -protoset`` does; no grpcurl binary is installed)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

ROOT = Path(__file__).resolve().parents[2]


def _readme_line(prefix: str) -> str:
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, lines
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_port_needs_the_protoset_and_answers_with_it(
    start_inprocess_server, tmp_path: Path
) -> None:
    health_port = _free_port()
    start_inprocess_server(health_port=health_port)
    # The README's one-liner, run as written with this environment's python first on PATH.
    writer = _readme_line('python -c "from google.protobuf.descriptor_pb2 import')
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path}
    subprocess.run(writer, shell=True, cwd=tmp_path, env=env, check=True, timeout=60)
    fds = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "health.protoset").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    request_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
    )
    response_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    )
    check = _readme_line("grpcurl -plaintext -protoset health.protoset")
    method = re.search(r" (grpc\.health\.v1\.Health)/(\w+)$", check)
    assert method is not None and "127.0.0.1:50052" in check
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        call = channel.unary_unary(
            f"/{method.group(1)}/{method.group(2)}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        for service in ("", "histohelper.v1.SlideAnalysisService"):
            reply = call(request_cls(service=service), timeout=10)
            assert response_cls.ServingStatus.Name(reply.status) == "SERVING"
        # No reflection there: grpcurl cannot discover the schema by itself.
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(reflect(iter([b""]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
