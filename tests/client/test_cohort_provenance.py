"""Cohort provenance across a hot swap of the server's default model version (tester B
finding 1): a run pins the version its model resolves to at its start in every request,
the manifest records per slide the version that actually served (from the result), and
a re-run redoes slides whose served version differs from what it resolves now. If the
pinned version disappears mid-run, its slides fail with MODEL_NOT_FOUND naming it.

One real in-process server over a repository ``tumour`` (``version_policy latest:2``);
the swap happens right after the run's GetModelInfo (a client wrapper triggers a rescan
there), so the race the tester hit is made deterministic.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cohort_support import start_repository_server, write_small_slide

from histohelper.client import SlideClient
from histohelper.client.aio import AsyncSlideClient
from histohelper.client.cohort import CohortSlide
from histohelper.client.cohort_runner import MANIFEST_NAME, assign_ids, run_cohort
from histohelper.client.options import AnalysisOptions


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("provenance-slides")
    for name, seed in (("a.tiff", 40), ("b.tiff", 41)):
        write_small_slide(root / name, seed=seed)
    return root


@pytest.fixture
def repository(tmp_path: Path, model_artifact: Path) -> Path:
    """``tumour/1`` only (the test adds ``tumour/2.pt``); two versions served at once."""
    repo = tmp_path / "repo"
    (repo / "tumour" / "1").mkdir(parents=True)
    (repo / "tumour" / "1" / "model.pt").symlink_to(model_artifact)
    (repo / "tumour" / "model.json").write_text('{"version_policy": "latest:2"}')
    return repo


@pytest.fixture
def server(repository: Path, slide_root: Path):
    running = start_repository_server(repository, slide_root)
    yield running
    running.stop(grace=0, drain=0)


class SwapAfterInfo:
    """An :class:`AsyncSlideClient` whose first ``get_model_info`` is followed by a
    change of the repository (``swap()``) and a rescan, before it returns."""

    def __init__(self, client: AsyncSlideClient, swap: Any) -> None:
        self._client = client
        self._swap = swap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def get_model_info(self, **kwargs: Any) -> Any:
        info = await self._client.get_model_info(**kwargs)
        if self._swap is not None:
            swap, self._swap = self._swap, None
            await asyncio.to_thread(swap)
        return info


def rescan(target: str) -> None:
    with SlideClient(target) as client:
        client.admin().rescan()


def run(target: str, out: Path, swap: Any = None) -> Any:
    items = assign_ids([CohortSlide("a.tiff"), CohortSlide("b.tiff")])

    async def main() -> Any:
        async with AsyncSlideClient(target) as client:
            wrapped: Any = SwapAfterInfo(client, swap)
            return await run_cohort(
                wrapped, items, out, base_options=AnalysisOptions(), jobs=2, quiet=True
            )

    return asyncio.run(main())


def served(out: Path) -> dict[str, tuple[str, str]]:
    doc = json.loads((out / MANIFEST_NAME).read_text())
    return {k: (e["model_name"], e["model_version"]) for k, e in doc["slides"].items()}


def test_hot_swap_mid_run_keeps_the_run_on_its_version_and_rerun_redoes(
    server, repository: Path, model_artifact_v2: Path, tmp_path: Path
) -> None:
    def add_v2() -> None:
        (repository / "tumour" / "2.pt").symlink_to(model_artifact_v2)
        rescan(server.target)

    out = tmp_path / "cohort"
    first = run(server.target, out, swap=add_v2)
    assert not first.failed, first.failed
    # Every request named tumour:1 (resolved at the start), so tumour:1 served them all.
    assert [(r["model"], r["model_version"]) for r in first.rows] == [("tumour", "1")] * 2
    assert served(out) == {"a": ("tumour", "1"), "b": ("tumour", "1")}
    doc = json.loads((out / MANIFEST_NAME).read_text())
    hashes = {e["model_hash"] for e in doc["slides"].values()}
    with SlideClient(server.target) as client:
        v1 = client.get_model_info(model="tumour:1").model.artifact_sha256
    assert hashes == {v1}

    # The default is now tumour:2: a re-run redoes both slides (served by 1), none skipped.
    second = run(server.target, out)
    assert [r["status"] for r in second.rows] == ["done", "done"]
    assert served(out) == {"a": ("tumour", "2"), "b": ("tumour", "2")}
    doc = json.loads((out / MANIFEST_NAME).read_text())
    assert {(m["name"], m["version"]) for m in doc["models"]} == {("tumour", "2")}
    third = run(server.target, out)
    assert [r["status"] for r in third.rows] == ["skipped", "skipped"]


def test_pinned_version_removed_mid_run_fails_those_slides_naming_it(
    server, repository: Path, model_artifact_v2: Path, tmp_path: Path
) -> None:
    def replace_v1() -> None:
        (repository / "tumour" / "2.pt").symlink_to(model_artifact_v2)
        shutil.rmtree(repository / "tumour" / "1")
        rescan(server.target)

    out = tmp_path / "cohort"
    first = run(server.target, out, swap=replace_v1)
    assert [r["status"] for r in first.rows] == ["failed", "failed"]
    for row in first.rows:
        assert row["error"].startswith("MODEL_NOT_FOUND: ")
        assert "'1'" in row["error"] and "tumour" in row["error"]
    second = run(server.target, out)  # resolves anew: tumour:2
    assert [r["status"] for r in second.rows] == ["done", "done"]
    assert served(out) == {"a": ("tumour", "2"), "b": ("tumour", "2")}
