"""The model repository: which model versions a server holds, loads, leases and unloads.

Layout of ``serve --model-repository DIR`` (the exported artifacts as they are)::

    DIR/
      tumour/                 one folder per model name ([A-Za-z0-9._-], no leading dot)
        1/model.pt            a version: a sub-folder holding one ``.pt`` artifact
        2/model.pt            (ONNX files of an ``--onnx`` export may sit beside it) ...
        3.pt                  ... or an artifact file, the version being its stem
        model.json            optional: {"version_policy": "latest:2", "default_version": "2"}

Names starting with ``.`` or ending in ``.tmp``/``.part`` are ignored, so a version
is dropped in atomically by copying under such a name and renaming. The version is the
folder (or file) name whatever the manifest says; a version given both as ``4/`` and
``4.pt`` is served from the folder, and names outside :data:`NAME` are ignored, each
logged once as a WARNING naming model and version (never a path). Versions sort
naturally (``2`` < ``10``; ``1.2`` < ``1.10``).

Version policy (server-wide ``--version-policy``, per model in ``model.json``):
``latest:N`` (the N newest versions that did not fail to load; the default is
``latest:1``), ``all``, or ``specific:V1,V2``. Each model's default version is
``model.json``'s ``default_version`` (or one set by an admin) when the policy serves
it, else its newest served version. The server's default model is ``--default-model``,
else the only (or first, by name) model.

Life of a version: *available* (served by the policy; loaded on first use or by an
admin), *loaded* (its runtime, model worker and warm-up passed; leasable), *failed* (it
failed to load, warm up or pass the runtime's manifest/parity gates: refused with a log
line naming model and version only, retried only once its file changes). A
:meth:`ModelRepository.rescan` (the ``--repository-poll-s`` poll, SIGHUP, or the admin
RescanRepository) loads and warms a model's new default version *before* the default
moves to it; versions the policy no longer serves are *retired*: no new call gets them,
and each is unloaded when its last call ends. A model's current default version is never
retired while it is still on disk: it keeps serving until its successor is loaded and
warmed. A successor that fails is marked failed (the old default stays); one that cannot
load yet because every ``--max-loaded-models`` slot has calls in flight is tried again
when a call ends (its lease released) and at each rescan. A call holds a :class:`Lease`
on the version it started with for its whole life. A loaded version whose artifact file
changed on disk (path, inode, size, mtime or ctime) is loaded and warmed again from the
new file by the next rescan and replaces the loaded one (calls in flight finish on the
old one, which then unloads); if the new file fails (load, warm-up, parity gates), the
loaded version keeps serving from memory, one WARNING names model and version, and the
listing gives the reason, until the file changes again. ``--max-loaded-models`` bounds
loaded versions: the least recently used one without calls in flight is unloaded first;
a rescan settles the server's default model last, so it is the one left loaded, and
never reloads a default that was unloaded to make room (it loads again on first use).

This module knows nothing of gRPC: what a loaded version is made of (runtime, worker,
analyzer...) is built by the ``build`` callable given to :class:`ModelRepository`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from histohelper.errors import (
    HistoHelperError,
    ModelInUseError,
    ModelLoadError,
    ModelNotFoundError,
)

log = logging.getLogger(__name__)

#: Model and version names the repository accepts (folder and file names).
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
#: The per-model settings file inside a model's folder.
MODEL_FILE = "model.json"
ARTIFACT_SUFFIX = ".pt"
_IGNORED_SUFFIXES = (".tmp", ".part")


class Closable(Protocol):
    """What a loaded version is made of: anything with ``close()``."""

    def close(self) -> None: ...


P = TypeVar("P", bound=Closable)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served.

    Attributes:
        kind: ``"latest"``, ``"all"`` or ``"specific"``.
        count: how many of the newest versions (``latest``).
        versions: the versions served (``specific``).
    """

    kind: str = "latest"
    count: int = 1
    versions: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``"latest:N"`` (``"latest"`` = ``latest:1``), ``"all"`` or ``"specific:V1,V2"``.

        Raises:
            ValueError: anything else.
        """
        kind, _, arg = text.strip().partition(":")
        if kind == "all" and not arg:
            return cls("all")
        if kind == "latest":
            if arg and (not arg.isdigit() or int(arg) < 1):
                raise ValueError(f"latest:N needs N >= 1, not {arg!r}")
            return cls("latest", int(arg) if arg else 1)
        if kind == "specific":
            versions = tuple(v.strip() for v in arg.split(",") if v.strip())
            if versions and all(NAME.match(v) for v in versions):
                return cls("specific", versions=versions)
        raise ValueError(f"expected latest:N, all or specific:V1,V2, not {text!r}")

    def select(self, versions: list[str]) -> list[str]:
        """The served ones of ``versions`` (sorted oldest first), in the same order."""
        if self.kind == "all":
            return list(versions)
        if self.kind == "specific":
            return [v for v in versions if v in self.versions]
        return list(versions[-self.count :])


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural sort key: digit runs compare as numbers (``2`` < ``10``)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"(\d+)", version)
        if part
    )


@dataclass(frozen=True)
class Found:
    """One version found on disk.

    Attributes:
        artifact: the ``.pt`` file (None when the folder holds none or several).
        signature: (path, inode, size, mtime_ns, ctime_ns) of the artifact: a failed
            version is retried only once this changes, and a loaded one is loaded again.
        problem: why the version cannot load, found without loading it ("" if none).
    """

    artifact: Path | None
    signature: Signature
    problem: str = ""


@dataclass(frozen=True)
class ModelFolder:
    """One model's folder: its versions, policy and pinned default."""

    versions: dict[str, Found]
    policy: VersionPolicy | None = None
    default_version: str = ""
    problem: str = ""


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name.endswith(_IGNORED_SUFFIXES)


#: What identifies an artifact file's bytes without reading them (see :class:`Found`).
Signature = tuple[str, int, int, int, int]


def _signature(path: Path) -> Signature:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: Warnings already logged, by (repository, message, model, version): a poll repeats none.
_warned: set[tuple[str, str, str, str]] = set()


def _warn_once(root: Path, message: str, model: str, version: str = "") -> None:
    """Log a repository warning naming model and version only (never a path), once."""
    key = (str(root), message, model, version)
    if key not in _warned:
        _warned.add(key)
        log.warning(message, extra={"model": model, "version": version})


def _find_version(entry: Path) -> tuple[str, Found] | None:
    model, root = entry.parent.name, entry.parent.parent
    if entry.is_file():
        if entry.suffix != ARTIFACT_SUFFIX:
            return None
        if not NAME.match(entry.stem):
            _warn_once(root, "artifact ignored: not a valid version name", model, entry.stem)
            return None
        return entry.stem, Found(entry, _signature(entry))
    if not entry.is_dir():
        return None
    if not NAME.match(entry.name):
        _warn_once(root, "version folder ignored: not a valid version name", model, entry.name)
        return None
    artifacts = sorted(
        p for p in entry.iterdir() if p.suffix == ARTIFACT_SUFFIX and not _ignored(p)
    )
    if len(artifacts) != 1:
        problem = "no .pt artifact" if not artifacts else "several .pt artifacts"
        return entry.name, Found(None, (str(entry), 0, len(artifacts), 0, 0), problem)
    return entry.name, Found(artifacts[0], _signature(artifacts[0]))


def discover(root: Path) -> dict[str, ModelFolder]:
    """Every model folder under ``root`` with its versions (nothing is loaded).

    Args:
        root: the repository directory.

    Returns:
        Model name -> its folder; versions sorted oldest first.

    Raises:
        OSError: ``root`` cannot be listed.
    """
    models: dict[str, ModelFolder] = {}
    for folder in sorted(root.iterdir()):
        if _ignored(folder) or not folder.is_dir():
            continue
        if not NAME.match(folder.name):
            _warn_once(root, "model folder ignored: not a valid model name", folder.name)
            continue
        # Folders after files: a version given both ways is served from its folder.
        entries = sorted(
            (e for e in folder.iterdir() if not _ignored(e)), key=lambda e: (e.is_dir(), e.name)
        )
        versions: dict[str, Found] = {}
        for entry in entries:
            if (item := _find_version(entry)) is None:
                continue
            if item[0] in versions:
                _warn_once(
                    root,
                    "version given both as a folder and as a .pt file: the folder is served",
                    folder.name,
                    item[0],
                )
            versions[item[0]] = item[1]
        versions = dict(sorted(versions.items(), key=lambda item: version_key(item[0])))
        policy, default, problem = None, "", ""
        settings = folder / MODEL_FILE
        if settings.is_file():
            try:
                data = json.loads(settings.read_text())
                if "version_policy" in data:
                    policy = VersionPolicy.parse(str(data["version_policy"]))
                default = str(data.get("default_version", ""))
            except json.JSONDecodeError as exc:
                problem = f"{MODEL_FILE} is invalid: {exc.msg} (line {exc.lineno})"
            except ValueError as exc:  # VersionPolicy.parse: names the policy only
                problem = f"{MODEL_FILE} is invalid: version_policy: {exc}"
            except OSError as exc:
                problem = f"{MODEL_FILE} cannot be read ({exc.strerror})"
            except AttributeError:
                problem = f"{MODEL_FILE} is invalid: not a JSON object"
        models[folder.name] = ModelFolder(versions, policy, default, problem)
    return models


def single_model(artifact: Path, name: str, version: str) -> dict[str, ModelFolder]:
    """A one-model repository of ``--model FILE`` (served under ``name``/``version``)."""
    return {name: ModelFolder({version: Found(artifact, _signature(artifact))})}


@dataclass(eq=False)
class Loaded(Generic[P]):
    """A loaded model version.

    Attributes:
        name, version: its repository names.
        parts: what ``build`` made (runtime, worker, ...).
        users: calls holding a lease on it.
        last_used: ``time.monotonic()`` of its last lease.
        retired: no new lease; unloaded once ``users`` is 0.
        signature: its artifact's :class:`Found` signature when it was loaded.
        replaced: another load of the same version took its place (its artifact
            changed); it unloads with its last call, without a health change.
    """

    name: str
    version: str
    parts: P
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retired: bool = False
    signature: Signature | None = None
    replaced: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """``(name, version)``."""
        return (self.name, self.version)


class Lease(Generic[P]):
    """A call's hold on a loaded version: it stays loaded until :meth:`release`."""

    def __init__(self, repository: ModelRepository[P], loaded: Loaded[P]) -> None:
        self._repository = repository
        self.loaded = loaded
        self._released = False

    @property
    def parts(self) -> P:
        """What the version is made of."""
        return self.loaded.parts

    def release(self) -> None:
        """Give the version back (idempotent); a retired one unloads with its last call."""
        if not self._released:
            self._released = True
            self._repository._release(self.loaded)


@dataclass(frozen=True)
class VersionState:
    """One version as the repository lists it (GetModelInfo, admin answers).

    Attributes:
        state: ``"loaded"``, ``"available"`` or ``"failed"``.
        error: why it failed (never a path).
    """

    name: str
    version: str
    state: str
    default_version: bool
    default_model: bool
    error: str = ""
    parts: object | None = None


class ModelRepository(Generic[P]):
    """The versions a server serves (see the module docstring). Thread-safe.

    Args:
        scan: returns the repository's folders (:func:`discover` of the directory, or
            :func:`single_model`).
        build: loads, warms and assembles one version: ``build(name, version, artifact)``.
            It raises on any failure (the version is then *failed*).
        policy: the version policy of models without their own.
        default_model: the server's default model name ("" = the only or first one).
        max_loaded: most versions loaded at once (0 = no bound).
        on_change: told ``(name, version, parts)`` when a version loads (``parts``: what
            ``build`` made) or unloads (``parts`` None), for the health service and
            metrics; called without the repository's lock.
    """

    def __init__(
        self,
        scan: Callable[[], dict[str, ModelFolder]],
        build: Callable[[str, str, Path], P],
        *,
        policy: VersionPolicy | None = None,
        default_model: str = "",
        max_loaded: int = 0,
        on_change: Callable[[str, str, P | None], None] | None = None,
    ) -> None:
        self._scan = scan
        self._build = build
        self.policy = policy or VersionPolicy()
        self._default_model = default_model
        self.max_loaded = max_loaded
        self.on_change = on_change
        self._lock = threading.RLock()
        self._folders: dict[str, ModelFolder] = {}
        self._loaded: dict[tuple[str, str], Loaded[P]] = {}
        self._loading: dict[tuple[str, str], Future[Loaded[P]]] = {}
        self._failed: dict[tuple[str, str], tuple[Signature, str]] = {}
        #: Loaded versions whose changed artifact failed to load: signature, reason.
        self._stale: dict[tuple[str, str], tuple[Signature, str]] = {}
        self._defaults: dict[str, str] = {}  # model -> default version (set once loaded)
        self._pinned: dict[str, str] = {}  # model -> default version set by an admin
        self._rescan_lock = threading.Lock()
        self._implicit_warned: tuple[str, ...] = ()
        #: Models whose new default version could not load yet (every slot in use).
        self._deferred: set[str] = set()
        #: The thread retrying them after a lease ends (joined by tests).
        self.retrying: threading.Thread | None = None
        self.closed = False

    # --- what is served -----------------------------------------------------------------

    def _served(self, name: str) -> list[str]:
        """Versions of ``name`` the policy serves now (oldest first; failed ones out)."""
        folder = self._folders[name]
        ok = [
            v
            for v, f in folder.versions.items()
            if not f.problem and self._failed.get((name, v), (None,))[0] != f.signature
        ]
        return (folder.policy or self.policy).select(ok)

    def _serving(self, name: str) -> list[str]:
        """:meth:`_served` plus the model's current default version while it is still
        on disk and not failed: it serves until its successor is loaded (lock held)."""
        served = self._served(name)
        current = self._defaults.get(name)
        found = self._folders[name].versions.get(current or "")
        if current is None or current in served or found is None or found.problem:
            return served
        failed = self._failed.get((name, current))
        if failed is not None and failed[0] == found.signature:
            return served
        return [*served, current]

    def _wanted_default(self, name: str) -> str | None:
        served = self._served(name)
        for pinned in (self._pinned.get(name), self._folders[name].default_version):
            if pinned and pinned in served:
                return pinned
        return served[-1] if served else None

    @property
    def default_model(self) -> str:
        """The server's default model name ("" while the repository is empty)."""
        with self._lock:
            if self._default_model in self._folders:
                return self._default_model
            return next(iter(sorted(self._folders)), "")

    def default_loaded(self) -> Loaded[P] | None:
        """The default model's default version, when loaded (tests, startup logs)."""
        with self._lock:
            name = self.default_model
            return self._loaded.get((name, self._defaults.get(name, "")))

    def loaded(self) -> list[Loaded[P]]:
        """Every loaded version (retired ones included until they unload)."""
        with self._lock:
            return list(self._loaded.values())

    def listing(self) -> list[VersionState]:
        """Every served or failed version of the repository with its state, by name
        then version; a model whose ``model.json`` is invalid also has a ``failed``
        entry with an empty version and the reason."""
        with self._lock:
            out = []
            default_model = self.default_model
            for name, folder in sorted(self._folders.items()):
                if folder.problem:  # the model's settings file: listed as a failed entry
                    out.append(
                        VersionState(
                            name, "", "failed", False, name == default_model, folder.problem
                        )
                    )
                served = set(self._serving(name))
                for version, found in folder.versions.items():
                    key = (name, version)
                    failed = self._failed.get(key)
                    loaded = self._loaded.get(key)
                    if loaded is not None and not loaded.retired:
                        stale = self._stale.get(key)
                        state, error = "loaded", ""
                        if stale is not None and stale[0] == found.signature:
                            error = (
                                "the artifact changed on disk and the new file failed to "
                                f"load ({stale[1]}); the loaded version keeps serving"
                            )
                    elif found.problem or (failed and failed[0] == found.signature):
                        state, error = "failed", found.problem or (failed[1] if failed else "")
                    elif version in served:
                        state, error = "available", ""
                    else:
                        continue  # outside the policy: not served, not listed
                    out.append(
                        VersionState(
                            name,
                            version,
                            state,
                            self._defaults.get(name) == version,
                            name == default_model,
                            error,
                            loaded.parts if state == "loaded" and loaded else None,
                        )
                    )
            return out

    # --- leases -------------------------------------------------------------------------

    def lease(self, name: str = "", version: str = "") -> Lease[P]:
        """Hold the version a call asked for (loading it first if it is available).

        Args:
            name: model name ("" = the server's default model).
            version: version ("" = that model's default version).

        Raises:
            ModelNotFoundError: no such model, or no such served version.
            ModelLoadError: the version failed to load (now or before).
            ModelInUseError: ``max_loaded`` versions are loaded and each has calls.
        """
        while True:
            with self._lock:
                key = self._resolve(name, version)
                loaded = self._loaded.get(key)
                if loaded is not None and not loaded.retired:
                    loaded.users += 1
                    loaded.last_used = time.monotonic()
                    return Lease(self, loaded)
            self._load(key)  # then lease it (unless retired or unloaded meanwhile)

    def _resolve(self, name: str, version: str) -> tuple[str, str]:
        name = name or self.default_model
        if name not in self._folders:
            raise ModelNotFoundError(f"the server's repository holds no model {name!r}")
        if not version:
            version = self._defaults.get(name) or self._wanted_default(name) or ""
            if not version:
                raise ModelNotFoundError(f"model {name!r} has no version that can be served")
        found = self._folders[name].versions.get(version)
        if found is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        failed = self._failed.get((name, version))
        if found.problem or (failed and failed[0] == found.signature):
            raise ModelLoadError(
                f"version {version} of model {name} failed to load: "
                + (found.problem or (failed[1] if failed else ""))
            )
        loaded = self._loaded.get((name, version))
        # A loaded version serves until it is retired: while a rescan loads the new
        # default, the policy already prefers it, but the old one still takes calls.
        if version not in self._serving(name) and (loaded is None or loaded.retired):
            raise ModelNotFoundError(
                f"version {version!r} of model {name!r} is not served (the version policy)"
            )
        return name, version

    def _release(self, loaded: Loaded[P]) -> None:
        with self._lock:
            loaded.users -= 1
            gone = loaded.retired and loaded.users == 0 and (self._drop(loaded) or loaded.replaced)
            retry = loaded.users == 0 and bool(self._deferred) and not self.closed
            if retry and (self.retrying is None or not self.retrying.is_alive()):
                self.retrying = threading.Thread(
                    target=self._retry_deferred, name="repository-retry", daemon=True
                )
                self.retrying.start()
        if gone:
            self._close(loaded, notify=not loaded.replaced)

    def _retry_deferred(self) -> None:
        """Settle again the models whose new default could not load for want of a free
        slot (a call just ended), then retire what their old defaults leave unserved."""
        try:
            with self._rescan_lock:
                changes: list[str] = []
                with self._lock:
                    self._deferred &= set(self._folders)  # removed models: nothing to settle
                    names = [] if self.closed else sorted(self._deferred)
                for name in names:
                    changes += self._settle_default(name)
                changes += self._retire_unserved()
            if changes:
                log.info("deferred model versions settled", extra={"changes": changes})
        except Exception:  # a background retry never raises; the next rescan tries again
            log.exception("deferred model version retry failed")

    def _drop(self, loaded: Loaded[P]) -> bool:
        """Forget ``loaded`` (lock held); True when it was still registered (a replaced
        load is not: its replacement stays)."""
        if self._loaded.get(loaded.key) is not loaded:
            return False
        del self._loaded[loaded.key]
        return True

    def _close(self, loaded: Loaded[P], notify: bool = True) -> None:
        """Unload (no lock held); ``notify`` False for a replaced load, whose version
        stays loaded."""
        try:
            loaded.parts.close()
        finally:
            log.info(
                "model version unloaded" if notify else "replaced load of a model version unloaded",
                extra={"model": loaded.name, "version": loaded.version},
            )
            if notify:
                self._notify(loaded.name, loaded.version, None)

    def _notify(self, name: str, version: str, parts: P | None) -> None:
        if self.on_change is not None:
            try:
                self.on_change(name, version, parts)
            except Exception:  # a listener never breaks loading
                log.exception("model change listener failed")

    # --- loading ------------------------------------------------------------------------

    def _load(self, key: tuple[str, str]) -> Loaded[P]:
        """Load ``key`` once (concurrent callers wait for the same load).

        Raises:
            ModelLoadError: it failed (the version is marked failed).
            ModelInUseError: no room under ``max_loaded``.
        """
        with self._lock:
            if key in self._loaded and not self._loaded[key].retired:
                return self._loaded[key]
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
                self._make_room(exclude=key)
                found = self._folders[key[0]].versions[key[1]]
        assert pending is not None
        if not owner:
            return pending.result()
        try:
            assert found.artifact is not None
            t0 = time.perf_counter()
            parts = self._build(key[0], key[1], found.artifact)
        except Exception as exc:
            error = _describe(exc)
            log.warning(
                "model version refused: %s",
                error,
                extra={"model": key[0], "version": key[1]},
            )
            with self._lock:
                self._failed[key] = (found.signature, error)
                del self._loading[key]
            failure = ModelLoadError(f"version {key[1]} of model {key[0]} failed to load: {error}")
            pending.set_exception(failure)
            raise failure from None
        loaded = Loaded(key[0], key[1], parts, signature=found.signature)
        with self._lock:
            old = self._loaded.get(key)
            self._loaded[key] = loaded
            self._failed.pop(key, None)
            del self._loading[key]
        log.info(
            "model version loaded in %.2f s",
            time.perf_counter() - t0,
            extra={"model": key[0], "version": key[1]},
        )
        if old is not None and old.users == 0:
            self._close(old)
        self._notify(key[0], key[1], parts)
        pending.set_result(loaded)
        return loaded

    def _make_room(self, exclude: tuple[str, str]) -> None:
        """Unload least recently used idle versions until one more fits (lock held).

        Raises:
            ModelInUseError: every loaded version has calls in flight.
        """
        if self.max_loaded <= 0:
            return
        while len(self._loaded) + len(self._loading) - 1 >= self.max_loaded:
            idle = [v for k, v in self._loaded.items() if v.users == 0 and k != exclude]
            if not idle:
                del self._loading[exclude]
                raise ModelInUseError(
                    f"{self.max_loaded} model versions are loaded (--max-loaded-models) and "
                    "each has calls in flight; retry later"
                    if self.max_loaded > 1
                    else "1 model version is loaded (--max-loaded-models) and it has calls "
                    "in flight; retry later"
                )
            victim = min(idle, key=lambda v: v.last_used)
            self._drop(victim)
            # Closed on another thread: the lock is held here, and closing joins threads.
            threading.Thread(target=self._close, args=(victim,), daemon=True).start()

    # --- rescan -------------------------------------------------------------------------

    def rescan(self) -> list[str]:
        """Read the repository again: load and warm each model's new default version
        before it takes traffic, retire versions no longer served, forget removed ones.

        Returns:
            One line per change (for logs and the admin answer; no paths).

        Raises:
            OSError: the repository cannot be listed (nothing changes).
        """
        with self._rescan_lock:
            folders = self._scan()
            changes: list[str] = []
            with self._lock:
                for name, folder in folders.items():
                    before = self._folders.get(name)
                    if folder.problem and (before is None or before.problem != folder.problem):
                        log.warning(
                            "model settings refused: %s", folder.problem, extra={"model": name}
                        )
                self._folders = folders
            self._warn_implicit_default()
            # The server's default model last: under --max-loaded-models it is the
            # most recently loaded, so never the one evicted to load another's default.
            default_model = self.default_model
            for name in sorted(folders, key=lambda n: (n == default_model, n)):
                changes += self._settle_default(name)
            changes += self._reload_changed()
            changes += self._retire_unserved()
            return changes

    def _reload_changed(self) -> list[str]:
        """Load again every loaded version whose artifact changed on disk, each replacing
        its old load once built (loaded and warmed: the build's gates); a new file that
        fails leaves the old load serving, with one WARNING and a listing note (tried
        again only when the file changes again). A replacement is loaded beside the old
        load for the swap, outside ``--max-loaded-models``."""
        with self._lock:
            todo = []
            for key, loaded in self._loaded.items():
                folder = self._folders.get(key[0])
                found = folder.versions.get(key[1]) if folder is not None else None
                if loaded.retired or found is None or found.artifact is None:
                    continue
                stale = self._stale.get(key)
                if loaded.signature is None or found.signature == loaded.signature:
                    self._stale.pop(key, None)
                elif stale is None or stale[0] != found.signature:
                    todo.append((loaded, found))
        changes = []
        for old, found in todo:
            key = old.key
            assert found.artifact is not None
            try:
                parts = self._build(key[0], key[1], found.artifact)
            except Exception as exc:
                error = _describe(exc)
                with self._lock:
                    self._stale[key] = (found.signature, error)
                log.warning(
                    "model version artifact changed on disk but the new file failed to "
                    "load: %s; the loaded version keeps serving",
                    error,
                    extra={"model": key[0], "version": key[1]},
                )
                changes.append(f"{key[0]}: version {key[1]} changed on disk, reload failed")
                continue
            new = Loaded(key[0], key[1], parts, signature=found.signature)
            with self._lock:
                current = self._loaded.get(key)
                if current is not old or old.retired:  # unloaded or retired meanwhile
                    current = None
                else:
                    self._loaded[key] = new
                    self._stale.pop(key, None)
                    old.retired = old.replaced = True
                    idle = old.users == 0
            if current is None:
                self._close(new, notify=False)
                continue
            log.info(
                "model version reloaded: its artifact changed on disk",
                extra={"model": key[0], "version": key[1]},
            )
            self._notify(key[0], key[1], parts)
            if idle:
                self._close(old, notify=False)
            changes.append(f"{key[0]}: version {key[1]} reloaded (artifact changed)")
        return changes

    def _warn_implicit_default(self) -> None:
        """Warn (once per set of models) when several models exist and the server's
        default model was not chosen (``--default-model`` unset or not in the repository):
        adding a model whose name sorts first silently moves calls that name none."""
        with self._lock:
            names = tuple(sorted(self._folders))
            implicit = self._default_model not in self._folders
            if not implicit or len(names) < 2 or names == self._implicit_warned:
                return
            self._implicit_warned = names
            default = self.default_model
        log.warning(
            "%d models and no --default-model in the repository: calls naming no model get "
            "the first by name (set --default-model, or SetDefaultModel with server_default)",
            len(names),
            extra={"model": default},
        )

    def _settle_default(self, name: str) -> list[str]:
        """Move ``name``'s default to the version it should be, loading it first; a
        version that fails is marked failed and the next one is tried."""
        while True:
            with self._lock:
                wanted = self._wanted_default(name)
                current = self._defaults.get(name)
                # A default already set stays (loaded on demand if it was evicted
                # under --max-loaded-models: a poll never reloads evicted versions).
                if wanted is None or wanted == current:
                    self._deferred.discard(name)
                    return []
            try:
                self._load((name, wanted))
            except ModelLoadError:
                continue  # marked failed: the policy now serves the next one
            except ModelInUseError as exc:
                # The current default keeps serving (_serving); tried again when a
                # lease is released and at the next rescan.
                with self._lock:
                    self._deferred.add(name)
                log.warning(
                    "model version not loaded yet (the default stays): %s",
                    exc,
                    extra={"model": name, "version": wanted},
                )
                return []
            with self._lock:
                if self._wanted_default(name) != wanted:
                    continue
                self._defaults[name] = wanted
                self._deferred.discard(name)
            log.info(
                "default model version set",
                extra={"model": name, "version": wanted, "previous": current or ""},
            )
            return [f"{name}: default version {current or '-'} -> {wanted}"]

    def _retire_unserved(self) -> list[str]:
        changes, close = [], []
        with self._lock:
            for key, loaded in list(self._loaded.items()):
                name, version = key
                if name in self._folders and version in self._serving(name):
                    continue
                if not loaded.retired:
                    loaded.retired = True
                    changes.append(f"{name}: version {version} retired")
                if loaded.users == 0 and self._drop(loaded):
                    close.append(loaded)
            for name in list(self._defaults):
                if name not in self._folders or self._defaults[name] not in self._serving(name):
                    del self._defaults[name]
        for loaded in close:
            self._close(loaded)
        return changes

    # --- admin --------------------------------------------------------------------------

    def load(self, name: str, version: str) -> None:
        """Load (and warm) a served version now.

        Raises:
            ModelNotFoundError, ModelLoadError, ModelInUseError: as :meth:`lease`.
        """
        self.lease(name, version).release()

    def unload(self, name: str, version: str) -> None:
        """Unload a loaded version (it stays available and loads again on first use).

        Raises:
            ModelNotFoundError: it is not loaded.
            ModelInUseError: it has calls in flight, or it is its model's default
                version (set another default first).
        """
        with self._lock:
            loaded = self._loaded.get((name or self.default_model, version))
            if loaded is None or loaded.retired:
                raise ModelNotFoundError("that model version is not loaded")
            if loaded.users:
                raise ModelInUseError(
                    f"that model version has {loaded.users} calls in flight; retry later"
                )
            if self._defaults.get(loaded.name) == loaded.version:
                raise ModelInUseError(
                    "that version is its model's default; set another default first"
                )
            self._drop(loaded)
        self._close(loaded)

    def set_default(self, name: str, version: str, server_default: bool = False) -> None:
        """Make ``version`` the default of ``name`` (loading it first), and optionally
        ``name`` the server's default model.

        Raises:
            ModelNotFoundError, ModelLoadError, ModelInUseError: as :meth:`lease`.
        """
        with self._lock:
            key = self._resolve(name, version)
        self.lease(*key).release()
        with self._lock:
            self._pinned[key[0]] = key[1]
            self._defaults[key[0]] = key[1]
            if server_default:
                self._default_model = key[0]

    def close(self) -> None:
        """Unload every version (server stop; calls have ended)."""
        with self._lock:
            self.closed = True
            retrying = self.retrying
        if retrying is not None:  # a deferred default loading: let it finish, then unload it
            retrying.join()
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), {}
        for version in loaded:
            self._close(version)


def _describe(exc: BaseException) -> str:
    """A refusal's reason without paths: the project's own message, else the type."""
    if isinstance(exc, HistoHelperError):
        return str(exc)
    return type(exc).__name__


def names_of(items: Iterable[VersionState]) -> list[str]:
    """``name:version`` of each listed version (logs, tests)."""
    return [f"{s.name}:{s.version}" for s in items]
