"""The one call path: every RPC of the server's services (``SlideAnalysisService``,
``ModelAdminService``) runs through it.

:func:`build_service` turns a table of :class:`Rpc` entries into the service's gRPC
handlers (``grpc.aio``). For every call, in this order, the call path owns:

1. the audit record (:mod:`.audit`), opened first and written exactly once with the
   status the client really received;
2. authentication and authorisation (:class:`.auth.Authenticator`; the RPC's role);
3. decoding of the request bytes (undecodable bytes are INVALID_ARGUMENT with
   ``MALFORMED_REQUEST``, never grpcio's INTERNAL "Exception deserializing request");
4. the request id (the request's own ``request_id`` where valid, else a new one);
5. the model version the request names (:attr:`Rpc.model`), leased from the model
   repository for the whole call (MODEL_NOT_FOUND before admission), then validation
   (the RPC's ``prepare``, on a worker thread) *before* admission, so a bad request
   gets its own error, not SERVER_BUSY;
6. admission to the RPC's slot pool (:class:`SlotPool`), refused at once when full;
7. the stop event (set on cancellation, deadline, stall or server shutdown; domain
   code checks it between batches) and the server's default deadline for calls whose
   client set none;
8. the stall limit: a message the client has not taken, or not sent, within
   ``stalled_stream_s`` ends the call (``STREAM_STALLED``) and frees its slot;
9. error mapping: a :class:`~histohelper.errors.HistoHelperError` becomes its status
   with an ``ErrorInfo`` detail; anything else INTERNAL carrying only the request id
   (the traceback stays in the server log).

Why ``grpc.aio``: a call waiting for its client (half-open, slow-sending, not
reading) is a suspended coroutine, not a blocked thread, so no client can take the
threads that health checks and other callers need. Blocking work (tiling, reading,
decoding, model calls) runs on a bounded thread pool through :meth:`Call.run` and
:meth:`Call.iterate`, never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from histohelper.errors import (
    DeadlineExceededError,
    HistoHelperError,
    InternalError,
    MalformedRequestError,
    PermissionDeniedError,
    StreamStalledError,
)
from histohelper.server import audit
from histohelper.server.auth import Authenticator, client_common_name
from histohelper.server.observe import NULL_OBSERVER, Observer
from histohelper.server.status import to_grpc_status

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Request ids accepted from clients; anything else is replaced by a new id.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: ``time_remaining()`` beyond this (about 3 years), or None, means no client deadline.
NO_DEADLINE_S = 1e8
#: A call that ends this close to its client's deadline ended by that deadline.
DEADLINE_SLACK_S = 0.1
_END = object()


class SlotPool:
    """A fixed number of slots taken without waiting (admission control).

    Thread-safe; :meth:`wait_idle` may be called from any thread (tests, shutdown).

    Args:
        size: slots (>= 1).
        refuse: builds the error raised when every slot is taken.
    """

    def __init__(self, size: int, refuse: Callable[[], HistoHelperError]) -> None:
        self.size = size
        self._refuse = refuse
        self._used = 0
        self._idle = threading.Condition()

    @property
    def in_use(self) -> int:
        """Slots currently taken."""
        with self._idle:
            return self._used

    def acquire(self) -> None:
        """Take a slot.

        Raises:
            HistoHelperError: the pool's refusal (e.g. SERVER_BUSY) when all are taken.
        """
        with self._idle:
            if self._used >= self.size:
                raise self._refuse()
            self._used += 1

    def release(self) -> None:
        """Give a slot back."""
        with self._idle:
            self._used -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no slot is taken; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._used == 0, timeout)


@dataclass(frozen=True)
class Rpc:
    """How one RPC runs on the call path.

    Attributes:
        handle: the domain call. Unary request: ``handle(prepared, call)``; streaming
            request: ``handle(requests, call)`` with ``requests`` an async iterator of
            decoded messages. A unary response is returned; a streamed one is sent
            with :meth:`Call.send` (``handle`` then returns None).
        prepare: validation and conversion of a unary request, run on a worker thread
            before admission: ``prepare(request, call) -> prepared`` (default: the
            request itself).
        role: the role the caller needs (``analyze``, ``upload``).
        pool: name of the slot pool the call holds while it runs; None: no slot.
        default_deadline: the server's default deadline applies when the client set
            none.
        model: the model version a unary request names: ``model(request)`` gives an
            object with ``name`` and ``version`` (a ``ModelRef``); the call path leases
            that version (:attr:`Call.model`) before ``prepare`` and releases it when the
            call ends. None: the call uses no model, or leases one itself
            (:meth:`Call.use_model`, streaming requests).
    """

    handle: Callable[..., Awaitable[Any]]
    prepare: Callable[[Any, Call], Any] | None = None
    role: str = "analyze"
    pool: str | None = None
    default_deadline: bool = True
    model: Callable[[Any], Any] | None = None


class ModelLeases(Protocol):
    """Where the call path leases model versions (the model repository)."""

    def lease(self, name: str = "", version: str = "") -> Any:
        """A lease with ``parts`` (the version's parts) and ``release()``; raises
        ``HistoHelperError`` (MODEL_NOT_FOUND, MODEL_LOAD_FAILED, ...)."""
        ...


@dataclass(frozen=True)
class CallLimits:
    """Time limits of the call path (seconds; 0 disables).

    Attributes:
        default_deadline_s: deadline of calls whose client set none.
        stalled_stream_s: longest wait for the client to take or send a message.
    """

    default_deadline_s: float = 3600.0
    stalled_stream_s: float = 30.0


@dataclass
class Call:
    """What a handler sees of its call.

    Attributes:
        rpc: method name (``AnalyzeSlide``, ...).
        request_id: id for logs, events and errors (never a slide name).
        record: the audit record (``audit.note`` adds to it).
        stop: set when the call must end (cancelled, deadline, stall, shutdown);
            domain code checks it between batches.
        t0: ``time.perf_counter()`` when the call arrived.
        model: the leased model version's parts (:meth:`use_model`; None before).
    """

    rpc: str
    context: grpc.aio.ServicerContext
    record: audit.CallRecord
    executor: Executor
    limits: CallLimits
    request_id: str = ""
    model: Any = None
    models: ModelLeases | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.perf_counter)
    _pending: set[concurrent.futures.Future[Any]] = field(default_factory=set)
    _generators: list[Iterator[Any]] = field(default_factory=list)
    _cleanups: list[Callable[[], object]] = field(default_factory=list)

    @property
    def log_extra(self) -> dict[str, str]:
        """``extra=`` for log calls: the request id (never a slide name)."""
        return {"request_id": self.request_id, "rpc": self.rpc}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn(*args)`` on the server's worker threads, in this call's
        context (its audit record). The call path waits for it before the call ends,
        even when this await was cancelled (a thread cannot be)."""
        ctx = contextvars.copy_context()
        work = self.executor.submit(ctx.run, fn, *args)
        self._pending.add(work)
        work.add_done_callback(self._pending.discard)
        return await asyncio.wrap_future(work)

    def iterate(self, gen: Iterator[T]) -> AsyncIterator[T]:
        """Step a blocking generator on worker threads, one item per step; the call
        path closes it (on a worker thread) when the call ends."""
        self._generators.append(gen)
        return _Steps(self, gen)

    async def use_model(self, ref: Any = None) -> Any:
        """Lease the model version ``ref`` names (``name``/``version``; None or empty:
        the default) for the rest of the call, on a worker thread (a first use may load
        it); the audit record names it. Returns its parts (also :attr:`model`).

        Raises:
            HistoHelperError: MODEL_NOT_FOUND, MODEL_LOAD_FAILED or MODEL_IN_USE.
        """
        if self.models is None:
            raise InternalError("this server has no model repository")
        name, version = (getattr(ref, "name", ""), getattr(ref, "version", ""))
        # A refused call's record names what was asked (or nothing), never the default.
        self.record.model_version = f"{name}:{version}" if version else name
        lease = await self.run(self.models.lease, name, version)
        self.on_end(lease.release)
        self.model = lease.parts
        self.record.model_version = f"{lease.loaded.name}:{lease.loaded.version}"
        return self.model

    def on_end(self, fn: Callable[[], object]) -> None:
        """Run blocking ``fn()`` on a worker thread when the call ends, however it ends."""
        self._cleanups.append(fn)

    async def send(self, message: Message) -> None:
        """Send one response message of a streamed response.

        Raises:
            StreamStalledError: the client has not taken messages for the stall limit.
        """
        stall = self.limits.stalled_stream_s
        try:
            if stall > 0:
                await asyncio.wait_for(self.context.write(message), stall)
            else:
                await self.context.write(message)
        except TimeoutError:
            raise StreamStalledError(
                f"the client took no message for {stall:g} s; the call was ended"
            ) from None
        except Exception as exc:
            # grpcio fails the write of a call the core has already ended (the client
            # cancelled, its deadline passed, the connection went) with ExecuteBatchError,
            # sometimes before the handler is cancelled: the client left, not a fault.
            if type(exc).__name__ == "ExecuteBatchError" or self.context.cancelled():
                raise asyncio.CancelledError from None
            raise

    async def _finish(self) -> None:
        """Stop domain work, wait for it, close generators, run cleanups."""
        self.stop.set()
        while self._pending:
            waiting = [asyncio.wrap_future(f) for f in list(self._pending)]
            await asyncio.gather(*waiting, return_exceptions=True)
        gens, cleanups = self._generators, self._cleanups
        if gens or cleanups:

            def close() -> None:
                for gen in gens:
                    close_gen = getattr(gen, "close", None)
                    if close_gen is not None:
                        close_gen()
                for fn in cleanups:
                    fn()

            await self.run(close)


class _Steps(Generic[T]):
    """Async iterator over a blocking generator (see :meth:`Call.iterate`)."""

    def __init__(self, call: Call, gen: Iterator[T]) -> None:
        self._call = call
        self._gen = gen

    def __aiter__(self) -> _Steps[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._call.run(next, self._gen, _END)
        if item is _END:
            raise StopAsyncIteration
        return item


def _decode(parse: Callable[[bytes], Message], raw: bytes) -> Message:
    try:
        return parse(raw)
    except (DecodeError, RuntimeWarning, ValueError, TypeError):
        raise MalformedRequestError(
            "the request message could not be decoded as the RPC's protobuf type"
        ) from None


async def _requests(
    call: Call, raw: AsyncIterator[bytes], parse: Callable[[bytes], Message]
) -> AsyncIterator[Message]:
    """Decoded request messages; a wait over the stall limit ends the call."""
    stall = call.limits.stalled_stream_s
    it = raw.__aiter__()
    while True:
        try:
            if stall > 0:
                data = await asyncio.wait_for(it.__anext__(), stall)
            else:
                data = await it.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise StreamStalledError(
                f"the client sent no message for {stall:g} s; the call was ended"
            ) from None
        yield _decode(parse, data)


class CallPath:
    """Runs every call of a service (see the module docstring).

    Args:
        authenticator: who the caller is.
        audit_log: where finished call records go.
        pools: slot pools by name (``Rpc.pool``).
        limits: deadlines and stall limit.
        executor: threads for blocking work.
        model_version: written into each audit record (replaced by ``name:version`` of
            the version a call leases).
        observer: told of every call's end (metrics), where the audit record is written.
        models: where calls lease model versions (:attr:`Rpc.model`, :meth:`Call.use_model`).
    """

    def __init__(
        self,
        authenticator: Authenticator,
        audit_log: audit.AuditLog,
        pools: Mapping[str, SlotPool],
        limits: CallLimits,
        executor: Executor,
        model_version: str,
        observer: Observer = NULL_OBSERVER,
        models: ModelLeases | None = None,
    ) -> None:
        self.models = models
        self.authenticator = authenticator
        self.audit_log = audit_log
        self.pools = dict(pools)
        self.limits = limits
        self.executor = executor
        self.model_version = model_version
        self.observer = observer
        self._live: dict[asyncio.Task[Any], Call] = {}
        # Calls of each pool that arrived and are not yet admitted (event loop only).
        self._waiting = dict.fromkeys(self.pools, 0)

    def waiting(self, pool: str) -> int:
        """Calls of ``pool`` that arrived and are not yet admitted (or refused)."""
        return self._waiting.get(pool, 0)

    async def drain(self) -> None:
        """Stop every call still running and wait until each has cleaned up, freed its
        slot and written its audit record (after the server stopped accepting calls
        and its grace period ended)."""
        for call in self._live.values():
            call.stop.set()
        tasks = list(self._live)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the steps of a call -------------------------------------------------------------

    def _open(self, rpc: str, context: grpc.aio.ServicerContext) -> Call:
        record = audit.CallRecord(
            rpc=rpc,
            request_id=uuid.uuid4().hex[:16],
            model_version=self.model_version,
            started=time.perf_counter(),
        )
        try:
            record.peer = context.peer()
        except Exception:
            record.peer = ""
        audit.set_current(record)
        call = Call(rpc, context, record, self.executor, self.limits, record.request_id)
        call.models = self.models
        return call

    def _authorise(self, call: Call, role: str) -> None:
        record, context = call.record, call.context
        record.client_cert = client_common_name(context)
        metadata = [(str(k), v) for k, v in context.invocation_metadata() or ()]
        principal = self.authenticator.authenticate(metadata, record.client_cert)
        record.caller = principal.identity
        if role not in principal.roles:
            hint = ""
            if principal.identity == "anonymous":
                hint = (
                    " (anonymous callers never have it: serve with --tokens-file or mutual "
                    "TLS, or --allow-anonymous-admin on a loopback development server)"
                )
            raise PermissionDeniedError(f"the caller lacks the '{role}' role{hint}")

    @staticmethod
    def _take_request_id(call: Call, request: Message) -> None:
        given = getattr(request, "request_id", "")
        if isinstance(given, str) and REQUEST_ID.fullmatch(given):
            call.request_id = call.record.request_id = given

    def _arm_deadline(self, call: Call, rpc: Rpc) -> asyncio.TimerHandle | None:
        """Arm the server's default deadline for a call whose client set none: when
        it passes, the stop event is set and the handler is cancelled."""
        limit = self.limits.default_deadline_s
        remaining = call.context.time_remaining()
        if not rpc.default_deadline or limit <= 0:
            return None
        if remaining is not None and remaining < NO_DEADLINE_S:
            return None
        task = asyncio.current_task()
        assert task is not None

        def expire() -> None:
            call.record.reason = DeadlineExceededError.reason
            setattr(call, "_expired", True)  # noqa: B010 - read by _run
            call.stop.set()
            task.cancel()

        return asyncio.get_running_loop().call_later(limit, expire)

    def _client_gone_outcome(self, call: Call) -> str:
        """DEADLINE_EXCEEDED when the client's own deadline has (about) passed, else
        CANCELLED. The core may end the call a few ms before Python's clock reaches the
        deadline, so :data:`DEADLINE_SLACK_S` counts as passed."""
        remaining = call.context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"

    async def _run(
        self,
        rpc_name: str,
        rpc: Rpc,
        context: grpc.aio.ServicerContext,
        body: Callable[[Call, Any], Awaitable[Any]],
        request: Message | None,
        decode_error: HistoHelperError | None = None,
    ) -> Any:
        """One call, start to end (steps 1-9 of the module docstring). Domain work is
        stopped and cleaned up (partial files removed, slots freed) and the audit
        record written *before* the client gets the final status."""
        call = self._open(rpc_name, context)
        task = asyncio.current_task()
        assert task is not None
        self._live[task] = call
        pool = self.pools.get(rpc.pool) if rpc.pool else None
        admitted = False
        timer: asyncio.TimerHandle | None = None
        error: HistoHelperError | None = None
        waiting = rpc.pool if pool is not None else None  # counted until admitted
        if waiting is not None:
            self._waiting[waiting] += 1
        try:
            try:
                timer = self._arm_deadline(call, rpc)
                self._authorise(call, rpc.role)
                if decode_error is not None:  # refused before admission, like bad options
                    raise decode_error
                if request is not None:
                    self._take_request_id(call, request)
                    if rpc.model is not None:
                        await call.use_model(rpc.model(request))
                prepared: Any = request
                if rpc.prepare is not None and request is not None:
                    prepared = await call.run(rpc.prepare, request, call)
                if pool is not None:
                    if waiting is not None:
                        self._waiting[waiting] -= 1
                        waiting = None
                    pool.acquire()
                    admitted = True
                result = await body(call, prepared)
                call.record.outcome = "OK"
                call.record.reason = None
                return result
            except asyncio.CancelledError:
                if not getattr(call, "_expired", False):
                    call.record.outcome = self._client_gone_outcome(call)
                    raise
                # The server's default deadline: tell the client, who is still there.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                raise DeadlineExceededError(
                    f"the call passed the server's default deadline of "
                    f"{self.limits.default_deadline_s:g} s (set a deadline to allow more)"
                ) from None
        except HistoHelperError as exc:
            log.info("%s refused or failed: %s", rpc_name, exc.reason, extra=call.log_extra)
            error = exc
        except Exception:
            log.exception("%s crashed", rpc_name, extra=call.log_extra)
            error = InternalError(f"internal server error (request id {call.request_id})")
        finally:
            if waiting is not None:
                self._waiting[waiting] -= 1
            if timer is not None:
                timer.cancel()
            try:
                await _until_done(call._finish())
            except Exception:  # a cleanup fault must not hide the call's own status
                log.exception("%s cleanup failed", rpc_name, extra=call.log_extra)
            finally:
                if admitted and pool is not None:
                    pool.release()
                if error is not None:
                    call.record.reason = error.reason
                    call.record.outcome = error.code
                self._write_audit(call)
                self._live.pop(task, None)
        status = to_grpc_status(error, call.request_id)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _write_audit(self, call: Call) -> None:
        record = call.record
        record.duration_s = time.perf_counter() - record.started
        if not record.outcome:
            record.outcome = "CANCELLED"
        self.audit_log.write(record)
        try:
            self.observer.call_ended(
                record.rpc, record.outcome, record.reason, record.duration_s, record.model_version
            )
        except Exception:  # metrics never fail a call
            log.exception("metrics of a call failed", extra={"request_id": record.request_id})
        audit.set_current(None)

    # --- handler shapes -----------------------------------------------------------------

    def handler(
        self,
        name: str,
        rpc: Rpc,
        parse: Callable[[bytes], Message],
        serialize: Callable[[Message], bytes],
        request_streaming: bool,
        response_streaming: bool,
    ) -> grpc.RpcMethodHandler:
        """The gRPC method handler of one RPC: raw request bytes in, decoded here."""

        if request_streaming:

            async def behavior(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
                async def body(call: Call, _: Any) -> Any:
                    return await rpc.handle(_requests(call, raw, parse), call)

                return await self._run(name, rpc, context, body, None)

            factory = (
                grpc.stream_stream_rpc_method_handler
                if response_streaming
                else grpc.stream_unary_rpc_method_handler
            )
        else:

            async def behavior(raw: bytes, context: grpc.aio.ServicerContext):  # type: ignore[misc]
                call_request: Message | None = None
                decode_error: MalformedRequestError | None = None
                try:
                    call_request = _decode(parse, raw)
                except MalformedRequestError as exc:
                    decode_error = exc

                async def body(call: Call, prepared: Any) -> Any:
                    return await rpc.handle(prepared, call)

                return await self._run(name, rpc, context, body, call_request, decode_error)

            factory = (
                grpc.unary_stream_rpc_method_handler
                if response_streaming
                else grpc.unary_unary_rpc_method_handler
            )
        return factory(behavior, request_deserializer=None, response_serializer=serialize)


async def _until_done(work: Awaitable[None]) -> None:
    """Await ``work`` to its end even if this task is cancelled meanwhile (once or
    many times): a call's slot is given back only after its domain work has stopped.
    A cancellation that arrived meanwhile is swallowed; the call is ending anyway."""
    task = asyncio.ensure_future(work)
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            continue
    task.result()


def build_service(service: Any, path: CallPath, rpcs: Mapping[str, Rpc]) -> grpc.GenericRpcHandler:
    """The generic handler of a service whose every method runs on ``path``.

    Args:
        service: the service's protobuf ``ServiceDescriptor``.
        path: the call path.
        rpcs: one :class:`Rpc` per method of the service.

    Raises:
        ValueError: a method of the service has no entry, or an entry names no method
            (no RPC can bypass the call path).
    """
    from google.protobuf import message_factory

    names = {m.name for m in service.methods}
    if names != set(rpcs):
        raise ValueError(f"RPC table and service differ: {sorted(names ^ set(rpcs))}")
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = path.handler(
            method.name,
            rpcs[method.name],
            request_cls.FromString,
            response_cls.SerializeToString,
            method.client_streaming,
            method.server_streaming,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
