"""Cohort runs: many slides, several in flight, retried where a retry can help.

The one implementation behind :meth:`SlideClient.analyze_many
<histohelper.client.sync.SlideClient.analyze_many>`, :meth:`AsyncSlideClient.analyze_many
<histohelper.client.aio.AsyncSlideClient.analyze_many>` and ``histohelper analyze`` with
several slides (whose files, manifest and table are :mod:`.cohort_runner`'s).

SDK semantics
-------------
``analyze_many(slides, options, jobs=K, retries=R)`` keeps at most K analyses in flight
and yields one :class:`SlideOutcome` per slide *as it finishes* (not in input order;
``outcome.index`` is the input position). A failed slide is an outcome with ``error``
set, never an exception: one bad slide never stops the others. Retried, with
exponential backoff and full jitter above a floor (:class:`Backoff`: before retry n,
``min(32, 4 * 2**(n-1))`` s plus a delay uniform in ``[0, min(32, 2**(n-1))]`` s, so
the default 4 retries span 60-75 s, longer than a server restart; Brooker, "Exponential
Backoff And Jitter", AWS Architecture Blog 2015), at most R times per slide:

- ``SERVER_BUSY`` (every analysis slot of the server taken),
- ``UNAVAILABLE`` (server unreachable, died mid-stream, or stopped: a server stopping
  cancels the calls it could not finish in its grace period with UNAVAILABLE),
- ``MODEL_IN_USE`` (the server's ``--max-loaded-models`` versions each have calls in
  flight, so the slide's version cannot be loaded yet),
- ``PACS_UNAVAILABLE`` (the PACS holding a ``dicomweb://`` slide is unreachable). Its
  ``retry_after_s`` hint is honoured: the delay is at least the hint (at most
  :data:`MAX_RETRY_AFTER_S`). The server marks it not for gRPC's own silent retries, so
  every retry of it is one here, reported as a ``"retry"`` progress event.

A ``SERVER_BUSY`` also lowers the number of slides in flight to what the servers took
(then it grows back by one slot per that many successes, AIMD), and slides waiting for
a retry get
the next free slot before new slides start: ``jobs`` above the servers' capacity costs
a few refused calls, not failed slides.
With several servers (``round_robin``, see :mod:`._channel`) the retry is a new call,
which the policy sends to the next ready server. Every other error (``SLIDE_NOT_FOUND``,
``SLIDE_CORRUPT``, ``INVALID_OPTIONS``, ``DEADLINE_EXCEEDED`` ...) fails the slide at once.
A slide given with ``upload=True`` is a local file uploaded at the start of each attempt
(an ``upload_id`` lives on the server that stored it, unless the replicas share their
upload directory).

CLI behaviour (``histohelper analyze``)
---------------------------------------
``histohelper analyze SLIDE --server ADDR --out DIR`` with one slide path is the
one-slide command (DIR holds that slide's files, a summary line is printed). Anything
else is a cohort run:

- inputs: several SLIDE arguments and/or FOLDERs (local folders, looked up under
  ``--slide-root``, the local view of the server's slide root, default the current
  directory; slide files found recursively by extension: ``.svs .tif .tiff .ndpi .mrxs
  .scn .vms .vmu .bif .svslide``; hidden files skipped; sorted), or one manifest CSV
  (column ``slide``; optional ``id``; optional per-slide options named like the request
  flags or the option fields: ``mpp``/``target_mpp``, ``magnification``/
  ``target_magnification``, ``level``/``target_level``, ``patch_size``/``patch_size_px``,
  ``stride``/``stride_px``, ``min_tissue``/``min_tissue_fraction``, ``edge_mode``,
  ``batch_size``, ``mpp_override``, ``mc_dropout_passes``, ``stain_normalization``,
  ``stain_reference``; an empty cell takes the
  command-line value; a per-slide resolution replaces the command line's; any other
  column is refused, exit 2). With ``--upload`` slides and folders are local files,
  uploaded before each attempt. A SLIDE argument or ``slide`` cell
  ``dicomweb://NAME/STUDY_UID/SERIES_UID`` is a series on a PACS the server's operator
  configured (:mod:`histohelper.client.dicomweb`), checked before the run and never
  uploaded; ``--dicom-out DIR`` / ``--stow`` write each slide's DICOM result objects to
  ``DIR/<id>/`` / its PACS (a slide whose objects fail is ``failed``, error ``DICOM: ...``).
- models: ``--model NAME[:VERSION]`` analyses every slide with that model of the
  server's repository; given several times (``--model a --model b:2``), every slide is
  analysed by each, side by side: ids ``<slide id>--<name>[-<version>]``, one table row
  per slide and model, adjacent, with the ``model`` and ``model_version`` that served.
- slide ids: the ``id`` cell, else the file stem (``.ome`` dropped, characters outside
  ``[A-Za-z0-9._-]`` replaced by ``_``); stems shared by several slides of the run get
  ``-<8 hex of SHA-256 of the reference>``. A DICOMweb series' id is
  ``NAME-<12 hex of SHA-256 of the URI>``: UIDs never name folders.
- ``--jobs K`` slides in flight (default 4; with one server at most its
  ``max_concurrent_analyses``, so it refuses none; fewer while servers answer
  SERVER_BUSY, see above); ``--retries N`` attempts per slide (and per gRPC call on
  UNAVAILABLE), 1..5, default 5.
- outputs: ``DIR/<id>/`` with exactly the files the one-slide command writes, written
  into ``DIR/.tmp-<id>-XXXX`` and renamed into place (never a half folder under the
  final name); ``DIR/run_manifest.json`` rewritten atomically after every slide;
  ``DIR/cohort.csv`` (one row per slide in input order, columns
  :data:`.cohort_runner.TABLE_COLUMNS` with ``prob_<class>`` after ``predicted_class``)
  at the end, and ``DIR/index.html`` when :mod:`.report` offers ``write_cohort_index``.
- models are pinned: each ``--model`` (or the server's default) is resolved once, at
  the start of the run (GetModelInfo), and every request names that ``NAME:VERSION``;
  the manifest records per slide the version and artifact hash that served it (from
  the result). A pinned version gone mid-run fails the remaining slides with
  ``MODEL_NOT_FOUND``.
- resume: a slide is ``skipped`` (no call to the server) when the manifest holds it as
  done or no_tissue with the same slide reference, and a served model name, version and
  hash equal to what the slide's model resolves to now (as
  :class:`.features.ModelIdentity` computes it from GetModelInfo of the slide's model),
  effective request options
  (``batch_size`` excepted) and overlay settings, and ``DIR/<id>/`` exists; anything
  else is analysed again. Manifest entries of slides not in this run are kept as they are.
- statuses: ``done``, ``skipped``, ``no_tissue``, ``failed`` (with ``error`` =
  ``REASON: message``, as safe to show as the server made it).
- progress bar on stderr (tqdm; ``--quiet`` hides it): slides done/total, ETA,
  patches/s, slides/h. At the end one summary line on stdout and each failure on stderr.
- exit code 0 when no slide failed, 1 when any did, 2 for bad usage (unknown manifest
  column, bad option cell, repeated id), 130 when interrupted (SIGINT), 143 on SIGTERM:
  either way the manifest keeps what finished and ``cohort.csv``/``index.html`` are
  written for those slides first. Outputs honour the umask; a DICOMweb slide is shown
  (``index.html``, ``report.html``, stderr) by its safe id, never its UIDs.
- one run per DIR at a time (a run removes the ``.tmp-*``/``.old-*`` folders an
  interrupted one left).
- on the servers, each attempt is one ``AnalyzeSlide`` audit record: a refused one has
  outcome ``RESOURCE_EXHAUSTED`` (reason ``SERVER_BUSY``), a finished analysis ``OK``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from histohelper.client.dicomweb import DicomWebSlide
from histohelper.client.events import Progress
from histohelper.client.models import ModelSpec, model_ref
from histohelper.client.options import AnalysisOptions
from histohelper.client.uploads import UploadedSlide
from histohelper.errors import (
    HistoHelperError,
    ModelInUseError,
    PacsUnavailableError,
    ServerBusyError,
    ServerUnavailableError,
)

if TYPE_CHECKING:
    from histohelper.client.aio import AsyncSlideClient
    from histohelper.client.result import SlideResult

#: Errors worth another attempt (see the module docstring).
RETRYABLE: tuple[type[HistoHelperError], ...] = (
    ServerBusyError,
    ServerUnavailableError,
    ModelInUseError,
    PacsUnavailableError,
)
#: Longest server retry hint (``retry_after_s``) a retry waits for, seconds.
MAX_RETRY_AFTER_S = 120.0


def retry_after_s(error: BaseException) -> float:
    """The server's retry hint of ``error`` (ErrorInfo metadata ``retry_after_s``) in
    seconds, clipped to [0, :data:`MAX_RETRY_AFTER_S`]; 0 without one."""
    try:
        hint = float(getattr(error, "metadata", {}).get("retry_after_s", 0))
    except (TypeError, ValueError):
        return 0.0
    return min(max(hint, 0.0), MAX_RETRY_AFTER_S) if hint == hint else 0.0


SlideRef = str | PurePath | UploadedSlide | DicomWebSlide


@dataclass(frozen=True, slots=True)
class CohortSlide:
    """One slide of a cohort.

    Attributes:
        slide: path relative to the server's slide root ("/"-separated), an
            :class:`UploadedSlide`, a DICOMweb series (a
            :class:`~histohelper.client.dicomweb.DicomWebSlide` or a
            ``dicomweb://NAME/STUDY_UID/SERIES_UID`` string), or with ``upload`` a local
            file.
        id: the caller's name for the slide (``None``: none).
        options: this slide's options (``None``: the run's options).
        upload: ``slide`` is a local file, uploaded at the start of each attempt.
        model: the server's repository model that analyses it, ``"NAME[:VERSION]"``
            (``None``: the run's ``model=``, else the server's default model and version).
        request_id: the id every attempt of this slide sends (echoed by the server and
            in its logs and audit records; ``None``: the server makes one per call).
    """

    slide: SlideRef
    id: str | None = None
    options: AnalysisOptions | None = None
    upload: bool = False
    model: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff between attempts of one slide: full jitter (Brooker, AWS
    Architecture Blog 2015) above an exponential floor.

    Retry ``n`` (1-based) waits ``min(cap_s, floor_s * 2**(n-1))`` plus a delay uniform
    in ``[0, min(cap_s, base_s * 2**(n-1))]``. The floors make the retries of a slide
    span at least :meth:`window_s` in all: with the defaults, the 4 retries of 5
    attempts (``--retries 5``) wait 4 + 8 + 16 + 32 = 60 s at least (75 s at most),
    longer than a server takes to restart (~20-30 s), so a restart fails no slide;
    the jitter spreads the slides a restart interrupted together. ``floor_s=0`` is plain
    full jitter.

    Attributes:
        base_s: ceiling of the first retry's jitter, seconds.
        cap_s: largest floor and largest jitter ceiling, seconds.
        floor_s: the first retry's floor, seconds (doubling per retry).
    """

    base_s: float = 1.0
    cap_s: float = 32.0
    floor_s: float = 4.0

    def __post_init__(self) -> None:
        if not (self.base_s >= 0 and self.floor_s >= 0 and self.cap_s >= self.base_s):
            raise ValueError("need 0 <= base_s <= cap_s and floor_s >= 0")

    def floor_at(self, retry: int) -> float:
        """The least delay before retry number ``retry`` (1-based), seconds."""
        return min(self.cap_s, self.floor_s * 2.0 ** (retry - 1))

    def delay_s(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based): :meth:`floor_at`
        plus a draw uniform in ``[0, min(cap_s, base_s * 2**(retry - 1))]``."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** (retry - 1))
        return self.floor_at(retry) + rng.uniform(0.0, ceiling)

    def window_s(self, retries: int) -> float:
        """The least total wait of ``retries`` retries, seconds (the sum of floors)."""
        return sum(self.floor_at(n) for n in range(1, retries + 1))


@dataclass(frozen=True, slots=True)
class SlideOutcome:
    """What happened to one slide of :func:`analyze_many`.

    Attributes:
        index: position of the slide in the input.
        item: the slide as given (a :class:`CohortSlide`).
        options: the options it was analysed with.
        result: the assembled result (``outcome`` ``"completed"`` or ``"no_tissue"``),
            or ``None`` when the slide failed.
        error: why it failed (the last attempt's error), or ``None``.
        attempts: calls made (1 + retries).
        wall_s: client wall time from the first attempt to the outcome, seconds
            (retry delays included).
    """

    index: int
    item: CohortSlide
    options: AnalysisOptions
    result: SlideResult | None
    error: BaseException | None
    attempts: int
    wall_s: float

    @property
    def ok(self) -> bool:
        """True when the slide has a result."""
        return self.result is not None

    @property
    def reason(self) -> str:
        """``"REASON: message"`` of a failure (``""`` when none): the error-table reason
        for HistoHelper errors, else the exception's type name."""
        err = self.error
        if err is None:
            return ""
        if isinstance(err, HistoHelperError):
            return f"{err.reason}: {err.message}"
        return f"{type(err).__name__}: {err}"


@dataclass(frozen=True, slots=True)
class CohortProgress:
    """A progress report of :func:`analyze_many` (``on_progress``).

    Attributes:
        index: the slide's input position.
        kind: ``"patches"`` (the slide's patch counts moved: ``patches_done`` of
            ``patches_total``; ``patches_done`` is 0 once the grid is known), ``"retry"``
            (attempt ``attempt`` failed with ``error``; the next starts after
            ``delay_s``), or ``"finished"`` (the slide's outcome is about to be yielded).
        patches_done, patches_total: the slide's patch counts (``"patches"``).
        attempt: the attempt number (1-based).
        delay_s: the delay before the next attempt (``"retry"``).
        error: the error of the failed attempt (``"retry"``).
    """

    index: int
    kind: Literal["patches", "retry", "finished"]
    patches_done: int = 0
    patches_total: int = 0
    attempt: int = 1
    delay_s: float = 0.0
    error: HistoHelperError | None = field(default=None, repr=False)


CohortProgressCallback = Callable[[CohortProgress], Any]


class ManySettings(TypedDict, total=False):
    """Keyword arguments of :func:`analyze_many` after ``options`` (as the clients'
    ``analyze_many`` methods take them): ``jobs``, ``retries``, ``on_progress``,
    ``backoff``, ``seed``, ``model``."""

    jobs: int
    retries: int
    on_progress: CohortProgressCallback | None
    backoff: Backoff
    seed: int | None
    model: ModelSpec


def as_cohort_slide(item: SlideRef | CohortSlide) -> CohortSlide:
    """``item`` as a :class:`CohortSlide` (a plain reference: a server path or upload)."""
    return item if isinstance(item, CohortSlide) else CohortSlide(item)


async def analyze_many(
    client: AsyncSlideClient,
    slides: Iterable[SlideRef | CohortSlide],
    options: AnalysisOptions | None = None,
    *,
    jobs: int = 4,
    retries: int = 4,
    on_progress: CohortProgressCallback | None = None,
    backoff: Backoff = Backoff(),
    seed: int | None = None,
    model: ModelSpec = None,
) -> AsyncIterator[SlideOutcome]:
    """Analyse many slides, ``jobs`` at a time; yield each outcome as it finishes.

    Semantics (retries, backoff, uploads) are in the module docstring. Closing the
    generator early (or cancelling its consumer) cancels the analyses in flight.

    Args:
        client: an open asyncio client (one server or several with ``round_robin``).
        slides: references or :class:`CohortSlide` items (read once, up front).
        options: options of every slide without its own (``None``: defaults).
        jobs: analyses in flight, >= 1.
        retries: retries per slide after the first attempt, >= 0.
        on_progress: called on the event loop with each :class:`CohortProgress`; keep
            it quick (it must not block). An exception it raises fails the slide it
            reports on (``"patches"``) or ends the run (raised here).
        backoff: delays between attempts.
        seed: seeds the jitter (``None``: from the system).
        model: the repository model (``"NAME[:VERSION]"`` or a
            :class:`~histohelper.client.models.ModelRef`) of every slide that names
            none in its :attr:`CohortSlide.model` (``None``: the server's default).

    Yields:
        One :class:`SlideOutcome` per slide, in finishing order.

    Raises:
        ValueError: ``jobs < 1``, ``retries < 0`` or a ``model`` string not of the
            form ``NAME[:VERSION]``.
    """
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    if retries < 0:
        raise ValueError("retries must be >= 0")
    default_model = model_ref(model)  # refuses a malformed string before any call
    items = [as_cohort_slide(s) for s in slides]
    if not items:
        return
    base = options or AnalysisOptions()
    rng = random.Random(seed)
    pending = iter(range(len(items)))
    # Outcomes, or the exception that ended a worker (an ``on_progress`` that raised).
    done: asyncio.Queue[SlideOutcome | Exception] = asyncio.Queue(maxsize=jobs)

    def report(event: CohortProgress) -> None:
        if on_progress is not None:
            on_progress(event)

    gate = _AdaptiveGate(jobs)

    async def attempt_once(item: CohortSlide, opts: AnalysisOptions, index: int, n: int) -> Any:
        ref = item.slide
        if item.upload:
            if isinstance(ref, UploadedSlide | DicomWebSlide):
                raise ValueError(f"upload=True needs a local file, not a {type(ref).__name__}")
            ref = await client.upload(ref)

        def progress(p: Progress) -> None:
            report(CohortProgress(index, "patches", p.patches_done, p.patches_total, n))

        return await client.analyze(
            ref,
            opts,
            on_progress=progress,
            request_id=item.request_id,
            model=item.model if item.model is not None else default_model,
        )

    async def one(index: int) -> SlideOutcome:
        item = items[index]
        opts = item.options or base
        t0 = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            await gate.acquire(priority=attempt > 1)
            released = False
            try:
                result = await attempt_once(item, opts, index, attempt)
                gate.release("ok")
                released = True
                return SlideOutcome(
                    index, item, opts, result, None, attempt, time.perf_counter() - t0
                )
            except RETRYABLE as exc:
                gate.release("busy" if isinstance(exc, ServerBusyError) else "other")
                released = True
                if attempt > retries:
                    return SlideOutcome(
                        index, item, opts, None, exc, attempt, time.perf_counter() - t0
                    )
                delay = max(backoff.delay_s(attempt, rng), retry_after_s(exc))
                report(CohortProgress(index, "retry", 0, 0, attempt, delay, exc))
                await asyncio.sleep(delay)
            except Exception as exc:  # one slide's failure never stops the cohort
                gate.release("other")
                released = True
                return SlideOutcome(index, item, opts, None, exc, attempt, time.perf_counter() - t0)
            finally:
                if not released:  # cancelled
                    gate.release("other")

    async def worker() -> None:
        try:
            for index in pending:  # shared iterator: each index goes to one worker
                outcome = await one(index)
                report(CohortProgress(index, "finished", attempt=outcome.attempts))
                await done.put(outcome)
        except Exception as exc:
            await done.put(exc)

    workers = [asyncio.create_task(worker()) for _ in range(min(jobs, len(items)))]
    try:
        for _ in range(len(items)):
            got = await done.get()
            if isinstance(got, Exception):
                raise got
            yield got
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


class _AdaptiveGate:
    """At most ``limit`` attempts in flight, ``limit`` adapted to the servers (AIMD).

    Starts at ``jobs``. A ``SERVER_BUSY`` lowers it to the number of this run's attempts
    still in flight (what the servers held when they refused); each success raises it
    by ``1 / limit`` back towards ``jobs`` (one more slot probed per ``limit``
    successes). Retries go before new slides, so a slot freed by a finished slide goes
    to a slide that was refused rather than to the next new one.

    Single event loop, no threads: ``release`` is synchronous.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.limit = float(jobs)
        self.in_flight = 0
        self.retries_waiting = 0
        self._changed = asyncio.Event()

    def _free(self, priority: bool) -> bool:
        room = self.in_flight < max(1, int(self.limit))
        return room and (priority or self.retries_waiting == 0)

    async def acquire(self, *, priority: bool) -> None:
        """Wait for a slot (``priority``: a retry, served before new slides)."""
        if priority:
            self.retries_waiting += 1
        try:
            while not self._free(priority):
                self._changed.clear()
                await self._changed.wait()
        finally:
            if priority:
                self.retries_waiting -= 1
                self._changed.set()
        self.in_flight += 1

    def release(self, outcome: Literal["ok", "busy", "other"]) -> None:
        """Give a slot back; ``outcome`` adapts the limit."""
        self.in_flight -= 1
        if outcome == "busy":
            self.limit = max(1.0, float(self.in_flight))
        elif outcome == "ok":
            self.limit = min(float(self.jobs), self.limit + 1.0 / self.limit)
        self._changed.set()


_END = object()


def analyze_many_blocking(
    connect: Callable[[], AsyncSlideClient],
    slides: Iterable[SlideRef | CohortSlide],
    options: AnalysisOptions | None = None,
    **kwargs: Any,
) -> Iterator[SlideOutcome]:
    """:func:`analyze_many` for blocking callers: runs it on a private event loop in a
    background thread and yields its outcomes here, as they finish.

    Args:
        connect: makes the asyncio client inside that loop (closed at the end).
        slides, options, kwargs: as :func:`analyze_many` (``on_progress`` is called on
            the background thread).

    Yields:
        One :class:`SlideOutcome` per slide, in finishing order. Closing the iterator
        early cancels the analyses in flight.

    Raises:
        ValueError: as :func:`analyze_many`.
        HistoHelperError: the client could not be created.
    """
    items = [as_cohort_slide(s) for s in slides]
    handoff: queue.Queue[Any] = queue.Queue(maxsize=1)
    loop = asyncio.new_event_loop()

    async def main() -> None:
        last: object = _END
        try:
            async with connect() as client:
                async for outcome in analyze_many(client, items, options, **kwargs):
                    await asyncio.to_thread(handoff.put, outcome)
        except Exception as exc:  # handed to the caller's thread
            last = exc
        await asyncio.to_thread(handoff.put, last)

    task = loop.create_task(main())

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            with contextlib.suppress(asyncio.CancelledError):  # the caller closed early
                loop.run_until_complete(task)
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="histohelper-analyze-many", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            got = handoff.get()
            if got is _END:
                finished = True
                return
            if isinstance(got, BaseException):
                finished = True  # main() has ended
                raise got
            yield got
    finally:
        if not finished:
            with contextlib.suppress(RuntimeError):  # the loop may be closing already
                loop.call_soon_threadsafe(task.cancel)
            while thread.is_alive():  # unblock a pending hand-off until the thread ends
                with contextlib.suppress(queue.Empty):
                    handoff.get(timeout=0.05)
        thread.join()
