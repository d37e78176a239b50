"""Client-side load balancing: a list of addresses or a ``dns:`` target uses
``round_robin``; three real in-process servers on loopback ports count the calls they
get in their audit logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histohelper.client import AsyncSlideClient, SlideClient
from histohelper.client._channel import channel_options, resolve_target


def _calls(audit: Path, rpc: str = "GetModelInfo") -> int:
    if not audit.exists():
        return 0
    return sum(json.loads(line)["rpc"] == rpc for line in audit.read_text().splitlines())


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:5001", ("127.0.0.1:5001", False)),
        ("localhost:5001", ("localhost:5001", False)),
        ("dns:///histohelper-headless:50051", ("dns:///histohelper-headless:50051", True)),
        (["127.0.0.1:5001", "127.0.0.2:5002"], ("ipv4:127.0.0.1:5001,127.0.0.2:5002", True)),
        ("127.0.0.1:5001, 127.0.0.1:5002", ("ipv4:127.0.0.1:5001,127.0.0.1:5002", True)),
        (["[::1]:5001", "[::1]:5002"], ("ipv6:[::1]:5001,[::1]:5002", True)),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", ("ipv4:10.0.0.1:1,10.0.0.2:1", True)),
        (["127.0.0.1:5001"], ("127.0.0.1:5001", False)),
    ],
    ids=["one", "hostname", "dns", "list4", "comma", "list6", "ipv4-uri", "list-of-one"],
)
def test_resolve_target(target: str | list[str], expected: tuple[str, bool]) -> None:
    assert resolve_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [["a.example:1", "b.example:1"], ["127.0.0.1:1", "[::1]:1"], ["127.0.0.1", "127.0.0.2"], []],
    ids=["hostnames", "mixed-families", "no-port", "empty"],
)
def test_resolve_target_refuses(target: list[str]) -> None:
    with pytest.raises(ValueError, match="server"):
        resolve_target(target)


def test_round_robin_service_config() -> None:
    cfg = json.loads(dict(channel_options(None, 1 << 20, round_robin=True))["grpc.service_config"])
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert cfg["healthCheckConfig"] == {"serviceName": ""}
    assert "methodConfig" not in cfg


def test_list_spreads_calls_over_three_servers_and_skips_a_draining_one(
    start_inprocess_server, tmp_path: Path
) -> None:
    audits = [tmp_path / f"audit{i}.jsonl" for i in range(3)]
    servers = [start_inprocess_server(audit_log=a) for a in audits]
    with SlideClient([s.target for s in servers]) as client:
        assert client.target.startswith("ipv4:")
        for _ in range(24):
            client.get_model_info()
        counts = [_calls(a) for a in audits]
        assert sum(counts) == 24
        # pick_first would give 24/0/0; round_robin reaches every server.
        assert all(n > 0 for n in counts), counts

        # A draining server (health NOT_SERVING) gets no new calls once the client's
        # health watch has seen it; 60 calls leave it time to, the next 30 must avoid it.
        draining = servers[1]
        draining._await(draining.health.enter_graceful_shutdown())
        for _ in range(60):
            client.get_model_info()
        before = [_calls(a) for a in audits]
        for _ in range(30):
            client.get_model_info()
        after = [_calls(a) for a in audits]
    assert after[1] == before[1]
    assert after[0] > before[0] and after[2] > before[2]


def test_async_client_round_robin(start_inprocess_server, tmp_path: Path) -> None:
    import asyncio

    audits = [tmp_path / f"audit{i}.jsonl" for i in range(3)]
    servers = [start_inprocess_server(audit_log=a) for a in audits]

    async def main() -> None:
        async with AsyncSlideClient(",".join(s.target for s in servers)) as client:
            for _ in range(24):
                await client.get_model_info()

    asyncio.run(main())
    counts = [_calls(a) for a in audits]
    assert sum(counts) == 24 and all(n > 0 for n in counts), counts
