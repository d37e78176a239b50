"""The model repository (issue 22) over real servers on loopback.

Two seeded untrained exports (seeds 0 and 1: same architecture, different weights)
are the versions. A swap from version 1 to 2 under a steady stream of analyses drops
no call, every result names its version and equals a one-version server's; a corrupt
version is refused while the old one serves; unknown models are NOT_FOUND; admin RPCs
need the admin role; an in-use version cannot be unloaded; ``--max-loaded-models``
unloads the least recently used idle version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import synthetic_slides as syn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histohelper.client import SlideClient
from histohelper.errors import (
    ModelInUseError,
    ModelLoadError,
    ModelNotFoundError,
    PermissionDeniedError,
)
from histohelper.server.app import model_health_name, start_server
from histohelper.server.config import ServerConfig
from histohelper.server.repository import VersionPolicy, discover, version_key

#: Small batches: quick warm-ups.
BATCH = 8


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.tiff: a small synthetic slide (a few dozen patches at 0.5 um/px)."""
    root = tmp_path_factory.mktemp("repo-slides")
    img = syn.slide_with_tissue(1400, 1800, [(100, 100, 900, 700)], seed=1)
    syn.write_slide(root / "a.tiff", img, [(450, 350)])
    return root


def add_version(repo: Path, name: str, version: str, artifact: Path) -> Path:
    """Drop ``artifact`` in as ``repo/name/version/model.pt`` atomically (a hidden
    folder renamed into place, as the README tells operators)."""
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    hidden = folder / f".{version}.incoming"
    hidden.mkdir()
    (hidden / "model.pt").symlink_to(artifact)
    os.rename(hidden, folder / version)
    return folder / version


@pytest.fixture
def serve(slide_root: Path):
    """Factory: a server over a repository (``**config`` overrides), stopped at the end."""
    started = []

    def start(**overrides: object):
        values: dict[str, object] = {
            "slide_root": slide_root,
            "port": 0,
            "precision": "fp32",
            "device": "cpu",
            "batch_size": BATCH,
            "grace_s": 2.0,
        }
        values.update(overrides)
        running = start_server(ServerConfig(**values))  # type: ignore[arg-type]
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(grace=0, drain=0)


def _probabilities(result) -> np.ndarray:
    return np.asarray(result.patches.probabilities)


# --- units: layout and policy -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "versions", "served"),
    [
        ("latest:1", ["1", "2", "10"], ["10"]),
        ("latest:2", ["1", "2", "10"], ["2", "10"]),
        ("all", ["1", "2"], ["1", "2"]),
        ("specific:1,10", ["1", "2", "10"], ["1", "10"]),
    ],
    ids=["latest1", "latest2", "all", "specific"],
)
def test_version_policy_selects(text: str, versions: list[str], served: list[str]) -> None:
    assert VersionPolicy.parse(text).select(sorted(versions, key=version_key)) == served


@pytest.mark.parametrize("text", ["latest:0", "newest", "specific:", "all:3"])
def test_bad_version_policy_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="latest:N"):
        VersionPolicy.parse(text)


def test_discover_reads_folders_files_and_settings(tmp_path: Path, model_artifact: Path) -> None:
    add_version(tmp_path, "tumour", "2", model_artifact)
    (tmp_path / "tumour" / "10.pt").symlink_to(model_artifact)
    (tmp_path / "tumour" / "3.pt.part").write_bytes(b"half a copy")  # ignored
    (tmp_path / "tumour" / "4").mkdir()  # no artifact: found, refused
    (tmp_path / "tumour" / "model.json").write_text('{"version_policy": "all"}')
    (tmp_path / ".hidden").mkdir()
    found = discover(tmp_path)
    assert list(found) == ["tumour"]
    folder = found["tumour"]
    assert list(folder.versions) == ["2", "4", "10"]
    assert folder.versions["4"].problem == "no .pt artifact"
    assert folder.policy == VersionPolicy("all")


# --- acceptance: swap under load --------------------------------------------------------


@pytest.mark.slow
def test_swap_under_a_stream_of_analyses_drops_no_call(
    serve, tmp_path: Path, model_artifact: Path, model_artifact_v2: Path, slide_root: Path
) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "tumour", "1", model_artifact)
    running = serve(model_repository=repo, repository_poll_s=0.2, max_concurrent_analyses=2)
    # (stream, version, version as SlideResult records it, result); the collector has
    # checked that Started and Completed name the same version.
    results: list[tuple[int, str, str, Any]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    seen_v2 = threading.Event()

    def stream(i: int) -> None:
        with SlideClient(running.target) as client:
            while not stop.is_set():
                try:
                    r = client.analyze("a.tiff")
                except Exception as exc:  # every failure counts against the swap
                    failures.append(exc)
                    return
                results.append((i, r.model.version, r.model_version, r))
                if r.model.version == "2":
                    seen_v2.set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    while len(results) < 4 and not failures:
        time.sleep(0.05)
    add_version(repo, "tumour", "2", model_artifact_v2)  # the poll picks it up
    assert seen_v2.wait(120), "version 2 never served"
    n_after = len(results) + 4
    while len(results) < n_after and not failures:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    versions = [(i, started, completed) for i, started, completed, _ in results]
    assert all(s == c and s in ("1", "2") for _, s, c in versions), versions
    for i in range(2):  # each client saw 1 ... 1 then 2 ... 2, never back
        seq = [s for j, s, _ in versions if j == i]
        assert seq == sorted(seq, key=int), seq
    by_version = {v: [r for _, s, _, r in results if s == v] for v in ("1", "2")}
    assert by_version["1"] and by_version["2"]
    # Each version's results equal those of a server that serves only that version.
    for version, artifact in (("1", model_artifact), ("2", model_artifact_v2)):
        alone = serve(model_path=artifact)
        with SlideClient(alone.target) as client:
            reference = client.analyze("a.tiff")
        for r in by_version[version]:
            assert np.array_equal(_probabilities(r), _probabilities(reference))
            assert r.prediction.probabilities == reference.prediction.probabilities
    # The retired version unloaded once its calls ended; health says so.
    assert [(v.name, v.version) for v in running.models.loaded()] == [("tumour", "2")]
    print(
        f"swap: {len(results)} analyses, 0 failed, "
        f"{len(by_version['1'])} on version 1, {len(by_version['2'])} on version 2"
    )


def test_a_corrupt_version_is_refused_and_the_old_one_serves(
    serve, tmp_path: Path, model_artifact: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "tumour", "1", model_artifact)
    running = serve(model_repository=repo)
    bad = repo / "tumour" / "2"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"PK\x03\x04 not a TorchScript archive" * 100)
    with caplog.at_level(logging.WARNING, logger="histohelper.server.repository"):
        running.rescan()
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all(str(tmp_path) not in r.getMessage() for r in refused)
    assert (refused[0].model, refused[0].version) == ("tumour", "2")
    with SlideClient(running.target) as client:
        result = client.analyze("a.tiff")
        assert (result.model.name, result.model.version) == ("tumour", "1")
        listing = {m.ref.version: m for m in client.get_model_info().models}
        assert listing["1"].state == "loaded" and listing["1"].default_version
        assert listing["2"].state == "failed" and listing["2"].error
        assert str(tmp_path) not in listing["2"].error
        with pytest.raises(ModelLoadError):
            client.analyze("a.tiff", model="tumour:2")


def test_unknown_models_and_versions_are_not_found(serve, model_artifact: Path) -> None:
    running = serve(model_path=model_artifact)
    with SlideClient(running.target) as client:
        info = client.get_model_info()
        name = info.model.name
        assert [m.state for m in info.models] == ["loaded"]
        assert len(info.model.artifact_sha256) == 64
        for model in ("no-such-model", f"{name}:no-such-version"):
            with pytest.raises(ModelNotFoundError):
                client.analyze("a.tiff", model=model)
            with pytest.raises(ModelNotFoundError):
                client.get_model_info(model=model)
        result = client.analyze("a.tiff", model=name)
        assert (result.model_name, result.model_version) == (name, info.model.version)
        predictions = list(client.classify([("p", np.zeros((64, 64, 3), np.uint8))], model=name))
        assert predictions[0].error == ""


def test_admin_rpcs_need_the_admin_role(serve, model_artifact: Path, tmp_path: Path) -> None:
    anonymous = serve(model_path=model_artifact)
    with SlideClient(anonymous.target) as client:
        with pytest.raises(PermissionDeniedError, match="allow-anonymous-admin"):
            client.admin().rescan()
        client.get_model_info()  # analysis calls stay open to anonymous callers
    tokens = tmp_path / "tokens.json"
    entries = [("lis", "t-analyze", ["analyze"]), ("ops", "t-admin", ["analyze", "admin"])]
    tokens.write_text(json.dumps({"tokens": [
        {"sha256": hashlib.sha256(t.encode()).hexdigest(), "identity": i, "roles": r}
        for i, t, r in entries
    ]}))  # fmt: skip
    audit = tmp_path / "audit.jsonl"
    guarded = serve(model_path=model_artifact, tokens_file=tokens, audit_log=audit)
    with (
        SlideClient(guarded.target, token="t-analyze") as client,
        pytest.raises(PermissionDeniedError),
    ):
        client.admin().rescan()
    with SlideClient(guarded.target, token="t-admin") as client:
        assert [m.state for m in client.admin().rescan()] == ["loaded"]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    rescans = [(r["caller"], r["outcome"]) for r in records if r["rpc"] == "RescanRepository"]
    assert rescans == [("lis", "PERMISSION_DENIED"), ("ops", "OK")]


def test_an_in_use_version_cannot_be_unloaded_and_lru_bounds_loaded_versions(
    serve, tmp_path: Path, model_artifact: Path, model_artifact_v2: Path
) -> None:
    repo = tmp_path / "repo"
    for version, artifact in (
        ("1", model_artifact),
        ("2", model_artifact_v2),
        ("3", model_artifact),
    ):
        add_version(repo, "tumour", version, artifact)
    (repo / "tumour" / "model.json").write_text('{"version_policy": "all"}')
    running = serve(model_repository=repo, max_loaded_models=2, allow_anonymous_admin=True)
    loaded = lambda: sorted(v.version for v in running.models.loaded())  # noqa: E731
    assert loaded() == ["3"]  # the default (newest) only; the others load on first use
    with SlideClient(running.target) as client, grpc.insecure_channel(running.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        def status(version: str) -> int:
            request = health_pb2.HealthCheckRequest(service=model_health_name("tumour", version))
            return health.Check(request).status

        assert client.analyze("a.tiff", model="tumour:1").model.version == "1"
        assert loaded() == ["1", "3"] and status("1") == health_pb2.HealthCheckResponse.SERVING
        client.analyze("a.tiff", model="tumour:2")  # 3 is the least recently used
        assert loaded() == ["1", "2"]
        deadline = time.monotonic() + 60  # a ceiling; unloading takes far less
        while status("3") != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # A call in flight holds version 2: it cannot be unloaded.
        gate = threading.Event()
        served = running.models.lease("tumour", "2")
        blocked = served.parts.worker.call(gate.wait)
        stream = client.stream("a.tiff", model="tumour:2")
        first = next(stream)  # started: the call holds its lease
        assert first.model.version == "2"
        with pytest.raises(ModelInUseError):
            client.admin().unload("tumour:2")
        # The bound: with 1 and 2 both in use, version 3 cannot load.
        lease1 = running.models.lease("tumour", "1")
        with pytest.raises(ModelInUseError):
            client.analyze("a.tiff", model="tumour:3")
        gate.set()
        blocked.result()
        lease1.release()
        served.release()
        list(stream)
        listing = client.admin().unload("tumour:2")
        assert {m.model.version: m.state for m in listing} == {
            "1": "loaded",
            "2": "available",
            "3": "available",
        }


class _Parts:
    """What a loaded version is made of, for the repository alone (no model needed)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_the_old_default_serves_while_the_new_version_loads(tmp_path: Path) -> None:
    """The window of a swap: the scan already sees version 2 (the policy prefers it)
    while it loads; calls asking for the default still get version 1 until 2 is ready."""
    from histohelper.server.repository import ModelRepository

    for version in ("1", "2"):
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "model.pt").write_bytes(b"artifact " + version.encode())
    (tmp_path / "m" / "2").rename(tmp_path / "m" / ".2")  # not there yet
    loading, release = threading.Event(), threading.Event()

    def build(name: str, version: str, artifact: Path) -> _Parts:
        if version == "2":
            loading.set()
            assert release.wait(30)
        return _Parts(version)

    repo = ModelRepository(lambda: discover(tmp_path), build)
    repo.rescan()
    old = repo.lease()
    (tmp_path / "m" / ".2").rename(tmp_path / "m" / "2")
    swap = threading.Thread(target=repo.rescan)
    swap.start()
    assert loading.wait(30)
    during = repo.lease()
    assert during.parts.version == "1"  # not MODEL_NOT_FOUND, not version 2
    release.set()
    swap.join()
    after = repo.lease()
    assert after.parts.version == "2"
    for lease in (during, old):  # version 1 retired: it unloads with its last call
        assert not lease.parts.closed
        lease.release()
    assert old.parts.closed and not after.parts.closed
    with pytest.raises(ModelNotFoundError):
        repo.lease("m", "1")


def _bounded_repository(root: Path):
    """A repository over ``root`` with version 1 of model ``m`` loaded, one slot
    (``max_loaded=1``); an artifact starting with ``garbage`` fails to build."""
    from histohelper.server.repository import ModelRepository

    def build(name: str, version: str, artifact: Path) -> _Parts:
        if artifact.read_bytes().startswith(b"garbage"):
            raise ValueError("not an artifact")
        return _Parts(version)

    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.pt").write_bytes(b"weights 1")
    repo = ModelRepository(lambda: discover(root), build, max_loaded=1)
    repo.rescan()
    return repo


def _drop_version(root: Path, version: str, content: bytes) -> None:
    hidden = root / "m" / f".{version}"
    hidden.mkdir()
    (hidden / "model.pt").write_bytes(content)
    hidden.rename(root / "m" / version)


def _states(repo) -> dict[str, tuple[str, bool]]:
    return {s.version: (s.state, s.default_version) for s in repo.listing()}


@pytest.mark.parametrize("successor", [b"weights 2", b"garbage, not a model"])
def test_the_default_serves_until_a_successor_deferred_by_the_slot_bound_is_live(
    tmp_path: Path, successor: bytes
) -> None:
    """Version 2 dropped in while the only slot (max_loaded=1) holds a call on version 1:
    it cannot load yet, so version 1 stays the default and keeps serving (not retired);
    when the last call on 1 ends, 2 is tried again: a valid 2 becomes the default, a
    broken 2 is listed failed and 1 still serves."""
    repo = _bounded_repository(tmp_path)
    held = repo.lease()
    _drop_version(tmp_path, "2", successor)
    assert repo.rescan() == []  # no slot: 2 waits, 1 is not retired
    assert repo.rescan() == []  # still no slot at the next rescan
    during = repo.lease()
    assert during.parts.version == "1" and during.parts is held.parts
    assert _states(repo) == {"1": ("loaded", True), "2": ("available", False)}
    during.release()
    held.release()  # the last call on 1 ends: 2 is tried again
    assert repo.retrying is not None
    repo.retrying.join(30)
    after = repo.lease()
    if successor.startswith(b"garbage"):
        assert after.parts.version == "1"
        assert _states(repo) == {"1": ("loaded", True), "2": ("failed", False)}
    else:
        assert after.parts.version == "2" and held.parts.closed
        assert _states(repo) == {"2": ("loaded", True)}
    after.release()
    assert repo.rescan() == []  # settled: nothing left to change
    assert repo.lease().parts.version == after.parts.version


def test_one_loaded_version_serves_two_models_and_audits_what_was_asked(
    serve, tmp_path: Path, model_artifact: Path, model_artifact_v2: Path
) -> None:
    """``--max-loaded-models 1`` with two models: the server default (first by name) is
    the one loaded at start, the other loads on first use (LRU); a poll reloads nothing.
    Refused calls are MODEL_NOT_FOUND naming what was asked, and so is their audit
    record (never the default version)."""
    repo = tmp_path / "repo"
    add_version(repo, "stroma", "1", model_artifact)
    add_version(repo, "tumour", "4", model_artifact_v2)
    audit = tmp_path / "audit.jsonl"
    running = serve(model_repository=repo, max_loaded_models=1, audit_log=audit)
    loaded = lambda: [f"{v.name}:{v.version}" for v in running.models.loaded()]  # noqa: E731
    assert loaded() == ["stroma:1"]
    running.rescan()
    assert loaded() == ["stroma:1"]
    with SlideClient(running.target) as client:
        assert client.analyze("a.tiff", model="tumour").model.version == "4"
        deadline = time.monotonic() + 60  # a ceiling; unloading takes far less
        while loaded() != ["tumour:4"]:  # stroma:1 unloads on another thread
            assert time.monotonic() < deadline, loaded()
            time.sleep(0.05)
        running.rescan()
        assert loaded() == ["tumour:4"]
        assert client.analyze("a.tiff").model.name == "stroma"
        for asked, words in (("tumour:9", "'tumour' has no version '9'"), ("nope", "'nope'")):
            with pytest.raises(ModelNotFoundError, match=words):
                client.analyze("a.tiff", model=asked)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    refused = [r["model_version"] for r in records if r.get("reason") == "MODEL_NOT_FOUND"]
    assert refused == ["tumour:9", "nope"]
    served = [r["model_version"] for r in records if r["outcome"] == "OK"]
    assert served[-2:] == ["tumour:4", "stroma:1"]


def test_anonymous_admin_is_refused_on_a_non_loopback_host(tmp_path: Path) -> None:
    """``--allow-anonymous-admin`` is for a loopback development server: on any other
    --host, serve stops before anything loads with one clear line (a child process:
    ``serve`` configures the process's logging)."""
    import subprocess
    import sys

    args = ["serve", "--slide-root", str(tmp_path), "--model", str(tmp_path / "no.pt")]
    args += ["--host", "0.0.0.0", "--allow-insecure", "--allow-anonymous-admin"]
    done = subprocess.run(
        [sys.executable, "-m", "histohelper.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("histohelper serve: refusing --allow-anonymous-admin on 0.0.0.0")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_repository_warnings_and_an_invalid_model_json_in_the_listing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version given both as a folder and a ``.pt`` file (the folder wins), ignored
    folder names and an implicit default among several models are logged naming model
    and version only; an invalid ``model.json`` is listed as a failed entry with why."""
    from histohelper.server.repository import ModelRepository

    for name, version in (("tumour", "4"), ("stroma", "1")):
        (tmp_path / name / version).mkdir(parents=True)
        (tmp_path / name / version / "model.pt").write_bytes(b"folder " + version.encode())
    (tmp_path / "tumour" / "4.pt").write_bytes(b"file 4")
    (tmp_path / "bad name").mkdir()
    (tmp_path / "tumour" / "bad version").mkdir()
    (tmp_path / "stroma" / "model.json").write_text('{"version_policy": "latest:0"}')
    built: list[Path] = []

    def build(name: str, version: str, artifact: Path) -> _Parts:
        built.append(artifact)
        return _Parts(version)

    repo = ModelRepository(lambda: discover(tmp_path), build)
    with caplog.at_level(logging.WARNING, logger="histohelper.server.repository"):
        repo.rescan()
        repo.rescan()  # a poll repeats no warning
    warnings = [(r.getMessage(), r.model, getattr(r, "version", "")) for r in caplog.records]
    assert all(str(tmp_path) not in m for m, _, _ in warnings)
    assert len(warnings) == len(set(warnings)) == 5
    found = {(model, version, m.split(":")[0]) for m, model, version in warnings}
    assert ("tumour", "4", "version given both as a folder and as a .pt file") in found
    assert ("bad name", "", "model folder ignored") in found
    assert ("tumour", "bad version", "version folder ignored") in found
    assert ("stroma", "", "model settings refused") in found
    assert any("no --default-model" in m for m, _, _ in warnings)
    assert tmp_path / "tumour" / "4" / "model.pt" in built
    settings = [s for s in repo.listing() if s.name == "stroma" and s.version == ""]
    assert [s.state for s in settings] == ["failed"]
    assert "latest:N needs N >= 1" in settings[0].error
