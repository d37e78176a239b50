"""A loaded model version whose artifact file changes on disk (tester B finding 13).

Before: overwriting a loaded version's model.pt (new weights, or garbage) and sending
SIGHUP changed nothing: the old weights kept serving, listed as loaded, nothing logged.
Now a rescan loads and warms the changed file and swaps it in; a file that fails keeps
the loaded version serving from memory, with one WARNING naming model and version
only and a note in the listing.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as syn
from test_model_repository import _Parts, serve  # noqa: F401 - serve: the fixture

from histohelper.client import SlideClient
from histohelper.server.repository import ModelRepository, discover


def test_a_changed_artifact_is_loaded_again_and_a_bad_one_leaves_the_old_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    artifact = tmp_path / "m" / "1" / "model.pt"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"weights A")
    changes: list[tuple[str, str, bool]] = []

    def build(name: str, version: str, path: Path) -> _Parts:
        content = path.read_bytes()
        if content.startswith(b"garbage"):
            raise ValueError("not an artifact")
        return _Parts(content.decode())  # its "version" is the file's content

    repo = ModelRepository(
        lambda: discover(tmp_path),
        build,
        on_change=lambda n, v, parts: changes.append((n, v, parts is not None)),
    )
    repo.rescan()
    in_flight = repo.lease()
    assert in_flight.parts.version == "weights A"

    with artifact.open("r+b") as fh:  # in place, same size
        fh.write(b"weights B")
    assert repo.rescan() == ["m: version 1 reloaded (artifact changed)"]
    assert repo.lease().parts.version == "weights B"  # new calls get the new file
    assert not in_flight.parts.closed  # the call in flight finishes on the old load
    in_flight.release()
    assert in_flight.parts.closed
    assert changes == [("m", "1", True), ("m", "1", True)]  # never NOT_SERVING

    artifact.write_bytes(b"garbage, not a model")
    with caplog.at_level(logging.WARNING, logger="histohelper.server.repository"):
        assert repo.rescan() == ["m: version 1 changed on disk, reload failed"]
        assert repo.rescan() == []  # tried once per change of the file
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and (warned[0].model, warned[0].version) == ("m", "1")
    assert str(tmp_path) not in warned[0].getMessage()
    lease = repo.lease()
    assert lease.parts.version == "weights B" and not lease.parts.closed
    lease.release()
    (state,) = repo.listing()
    assert state.state == "loaded" and "failed to load (not an artifact" not in state.error
    assert "changed on disk" in state.error and "keeps serving" in state.error

    artifact.write_bytes(b"weights C")  # fixed: loaded again, the note goes
    assert repo.rescan() == ["m: version 1 reloaded (artifact changed)"]
    (state,) = repo.listing()
    assert state.error == "" and repo.lease().parts.version == "weights C"


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifact-change-slides")
    syn.write_slide(root / "a.tiff", syn.slide_with_tissue(700, 900, [(50, 50, 800, 600)], seed=2))
    return root


@pytest.mark.parametrize("layout", ["repository", "model_file"])
def test_a_served_version_overwritten_on_disk_over_a_real_server(
    serve,  # noqa: F811 - test_model_repository's fixture
    model_artifact: Path,
    model_artifact_v2: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    layout: str,
) -> None:
    """``--model-repository`` (tumour/1/model.pt) and ``--model FILE`` alike."""
    if layout == "repository":
        served = tmp_path / "repo" / "tumour" / "1" / "model.pt"
        where: dict[str, object] = {"model_repository": tmp_path / "repo"}
    else:
        served = tmp_path / "model.pt"
        where = {"model_path": served}
    served.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_artifact, served)
    running = serve(cache_dir=tmp_path / "cache", **where)
    with SlideClient(running.target) as client:
        before = client.analyze("a.tiff")
        name_version = (before.model.name, before.model.version)
        shutil.copyfile(model_artifact_v2, served)  # new weights, same path
        running.rescan()
        after = client.analyze("a.tiff")
        v2_sha = hashlib.sha256(model_artifact_v2.read_bytes()).hexdigest()
        assert after.model.artifact_sha256 == v2_sha != before.model.artifact_sha256
        assert not after.cached  # the cache key follows the artifact's hash
        assert not np.array_equal(before.patches.probabilities, after.patches.probabilities)

        served.write_bytes(b"PK\x03\x04 not a TorchScript archive" * 100)
        with caplog.at_level(logging.WARNING, logger="histohelper.server.repository"):
            running.rescan()
            running.rescan()
        warned = [r for r in caplog.records if "changed on disk" in r.getMessage()]
        assert len(warned) == 1 and (warned[0].model, warned[0].version) == name_version
        assert str(tmp_path) not in warned[0].getMessage()
        still = client.analyze("a.tiff")  # the loaded version serves from memory
        assert still.model.artifact_sha256 == v2_sha
        np.testing.assert_array_equal(still.patches.probabilities, after.patches.probabilities)
        (listed,) = client.get_model_info().models
        assert listed.state == "loaded" and "changed on disk" in listed.error
        assert str(tmp_path) not in listed.error
