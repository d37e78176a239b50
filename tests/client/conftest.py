"""Fixtures of the client tests: a scripted real gRPC server on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_fakes import ScriptedServer, start_scripted_server


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    """A fresh scripted server per test; set ``scripted.script`` fields before calling."""
    srv = start_scripted_server()
    yield srv
    srv.server.stop(grace=None)
