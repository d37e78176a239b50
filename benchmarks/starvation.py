"""Starvation benchmark: can bad clients starve a well-behaved one? (issue 16)

Against a real ``histohelper serve`` process (``--stalled-stream-s`` S, an audit log,
``--max-concurrent-analyses`` 2 unless told otherwise):

1. **idle**: a well-behaved client times N health ``Check`` and N ``GetModelInfo``
   calls (one of each every ``--pace-s``) and A ``AnalyzeSlide`` calls of
   CMU-1-Small-Region (after one warm-up of each);
2. **bad calls open**: 200 half-open calls (``GetModelInfo`` and ``AnalyzeSlide``
   alternately, as client streams whose request iterator never ends, so the server
   never sees a complete request) and 50 non-reading ``AnalyzeSlide`` streams (raw
   bytes, ``return_embeddings``, on a channel without BDP probing, never iterated: the
   server's writes block once the 64 KiB flow-control window is full). Only
   ``max_concurrent_analyses`` of them are admitted; the rest get
   ``RESOURCE_EXHAUSTED`` (SERVER_BUSY) at once: both are counted;
3. **loaded**: the same paced health and ``GetModelInfo`` calls while all of them are
   open (the admitted non-reading streams analyse, then block, meanwhile);
4. **slot free**: ``AnalyzeSlide`` is tried every 0.25 s until one is admitted; the
   time from opening the non-reading streams to that admission is when a slot came
   free (``--admission-wait-s`` at most; a call that gets no reply at all, queued
   behind a full thread pool, is cancelled then);
5. **after**: health, ``GetModelInfo`` and A analyses again, the 200 half-open calls
   still open; then the audit log's ``STREAM_STALLED`` records (each one's duration is
   how long that stream held its slot) and what the non-reading clients saw.

Latency ratios are loaded (or after) median / idle median. A call that times out
(``--call-timeout-s``) counts as a timeout; after 3 timeouts of one kind that kind is
not tried further in that phase.

Usage::

    .venv/bin/python benchmarks/starvation.py --model M.pt [--tree /tmp/old-hh]
        [--half-open 200] [--non-reading 50] [--stall-s 10] [--repeats 30]

``--tree`` runs the server from another code tree (``git archive <commit>`` unpacked;
see ``treeserve.py``); a server without ``--stalled-stream-s`` runs without it.
Prints a table; ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import treeserve  # noqa: E402

from histohelper.v1 import slide_analysis_pb2 as pb  # noqa: E402
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "/histohelper.v1.SlideAnalysisService/"
SLIDES = HERE.parent.parent / "shared" / "slides"
SLIDE = "real/CMU-1-Small-Region.svs"
NO_BDP = [("grpc.http2.bdp_probe", 0)]
MAX_TIMEOUTS = 3


def _log(msg: str) -> None:
    print(f"[starvation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the well-behaved client ----------------------------------------------------------


class Tally:
    """Latencies (ms), timeouts and other errors of one kind of call."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.times_ms: list[float] = []
        self.timeouts = self.errors = 0

    def call(self, fn: Callable[[], object]) -> None:
        """Time ``fn()``; after MAX_TIMEOUTS timeouts this kind is not tried again."""
        if self.timeouts >= MAX_TIMEOUTS:
            return
        t0 = time.perf_counter()
        try:
            fn()
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.timeouts += 1
            else:
                self.errors += 1
            return
        self.times_ms.append((time.perf_counter() - t0) * 1e3)

    def summary(self) -> dict[str, Any]:
        times = self.times_ms
        return {
            "n": len(times),
            "median_ms": round(statistics.median(times), 3) if times else None,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "timeout_s": self.timeout_s,
        }


def analyze_once(stub: pb_grpc.SlideAnalysisServiceStub, slide: str, timeout_s: float) -> float:
    """One AnalyzeSlide to its completed event; seconds. Raises grpc.RpcError."""
    t0 = time.perf_counter()
    last = None
    for event in stub.AnalyzeSlide(pb.AnalyzeSlideRequest(slide_path=slide), timeout=timeout_s):
        last = event
    if last is None or last.WhichOneof("event") != "completed":
        raise RuntimeError("analysis ended without a completed event")
    return time.perf_counter() - t0


def measure(target: str, args: argparse.Namespace, analyses: bool = True) -> dict[str, Any]:
    """Health, GetModelInfo and (optionally) A analyses from a fresh, well-behaved channel."""
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.SlideAnalysisServiceStub(channel)
        t = args.call_timeout_s
        checks, infos = Tally(t), Tally(t)
        # One health Check and one GetModelInfo every pace_s: both sample the same
        # stretch of time (the idle one as the loaded one).
        start = time.perf_counter()
        for i in range(args.repeats):
            wait = start + i * args.pace_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            checks.call(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=t))
            infos.call(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=t))
        out: dict[str, Any] = {"health": checks.summary(), "model_info": infos.summary()}
        if analyses:
            runs = [
                analyze_once(stub, args.slide, args.analysis_timeout_s)
                for _ in range(args.analyses)
            ]
            out["analysis"] = {
                "runs_s": [round(x, 3) for x in runs],
                "median_s": round(statistics.median(runs), 3),
            }
    return out


def _first_event(call: Any, wait_s: float) -> Any:
    """The call's first event; raises grpc.RpcError, or TimeoutError (call cancelled)
    when nothing came within ``wait_s`` (e.g. queued behind a full thread pool)."""
    box: list[Any] = []

    def take() -> None:
        try:
            box.append(next(call))
        except BaseException as exc:  # handed to the caller below
            box.append(exc)

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(wait_s)
    if not box:
        call.cancel()
        raise TimeoutError
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def wait_for_admission(target: str, args: argparse.Namespace, t_open: float) -> dict[str, Any]:
    """Try AnalyzeSlide every 0.25 s until one is admitted (its ``started`` event);
    that analysis then runs to completion and is timed from its own request. Gives up
    after ``args.admission_wait_s``."""
    busy = 0
    give_up = time.monotonic() + args.admission_wait_s
    request = pb.AnalyzeSlideRequest(slide_path=args.slide)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SlideAnalysisServiceStub(channel)
        while time.monotonic() < give_up:
            t0 = time.perf_counter()
            call = stub.AnalyzeSlide(request, timeout=args.analysis_timeout_s)
            try:
                last = _first_event(call, give_up - time.monotonic())
            except TimeoutError:
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return {
                        "admitted_after_s": None,
                        "busy_replies": busy,
                        "error": exc.code().name,
                    }
                busy += 1
                time.sleep(0.25)
                continue
            admitted = time.perf_counter() - t_open
            for event in call:
                last = event
            assert last.WhichOneof("event") == "completed", "admitted analysis did not complete"
            return {
                "admitted_after_s": round(admitted, 2),
                "busy_replies": busy,
                "first_admitted_analysis_s": round(time.perf_counter() - t0, 3),
            }
    return {
        "admitted_after_s": None,
        "busy_replies": busy,
        "gave_up_after_s": args.admission_wait_s,
        "error": "no reply" if busy == 0 else "SERVER_BUSY",
    }


# --- the bad clients ------------------------------------------------------------------


class BadClients:
    """Half-open calls and non-reading AnalyzeSlide streams, opened and held."""

    def __init__(self, target: str, half_open: int, non_reading: int, hold_s: float) -> None:
        self.release = threading.Event()
        self.half_channel = grpc.insecure_channel(target)
        self.silent_channel = grpc.insecure_channel(target, options=NO_BDP)
        methods = ("GetModelInfo", "AnalyzeSlide")
        self.half_open = [
            self.half_channel.stream_unary(SERVICE + methods[i % 2]).future(
                self._never(), timeout=hold_s
            )
            for i in range(half_open)
        ]
        request = pb.AnalyzeSlideRequest(
            slide_path=SLIDE, options=pb.AnalysisOptions(return_embeddings=True)
        ).SerializeToString()
        self.t_open_silent = time.perf_counter()
        rpc = self.silent_channel.unary_stream(SERVICE + "AnalyzeSlide")
        self.non_reading = [rpc(request, timeout=hold_s) for _ in range(non_reading)]

    def _never(self) -> Iterator[bytes]:
        self.release.wait()
        return
        yield b""  # never reached

    def non_reading_state(self) -> dict[str, int]:
        """How many non-reading calls ended, by status code, and how many are open."""
        counts: dict[str, int] = {}
        for call in self.non_reading:
            key = call.code().name if call.done() else "open"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def settle(self, expect_open: int, wait_s: float = 15.0) -> dict[str, int]:
        """Wait (at most ``wait_s``) until at most ``expect_open`` non-reading calls are open."""
        deadline = time.monotonic() + wait_s
        state = self.non_reading_state()
        while state.get("open", 0) > expect_open and time.monotonic() < deadline:
            time.sleep(0.05)
            state = self.non_reading_state()
        return state

    def half_open_done(self) -> int:
        return sum(call.done() for call in self.half_open)

    def close(self) -> None:
        self.release.set()
        for call in [*self.half_open, *self.non_reading]:
            call.cancel()
        self.half_channel.close()
        self.silent_channel.close()


def stalled_records(audit_path: Path) -> list[dict[str, Any]]:
    if not audit_path.exists():
        return []
    records = [json.loads(line) for line in audit_path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("reason") == "STREAM_STALLED"]


# --- run ------------------------------------------------------------------------------


def ensure_model(tree: Path | None, cache: Path) -> Path:
    """A plain exported model (seed 0, TorchScript fp32) written by ``tree``'s export."""
    import subprocess

    out = (
        cache
        / f"starvation-model-{'main' if tree is None else tree.resolve().name}"
        / "histohelper.pt"
    )
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _log("exporting a model (once)")
        subprocess.run(
            [*treeserve.histohelper_command(tree), "export", str(out), "--seed", "0"],
            check=True,
            capture_output=True,
        )
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stall = treeserve.serve_supports(args.tree, "--stalled-stream-s")
    audit_path = workdir / "audit.jsonl"
    # The old sync server spelt the slot flag --max-concurrent.
    slots = "--max-concurrent-analyses"
    if not treeserve.serve_supports(args.tree, slots):
        slots = "--max-concurrent"
    extra = ["--audit-log", str(audit_path), slots, str(args.max_analyses)]
    if stall:
        extra += ["--stalled-stream-s", str(args.stall_s)]
    model = args.model or ensure_model(
        args.tree, Path(tempfile.gettempdir()) / "histohelper-starvation"
    )
    r: dict[str, Any] = {
        "tree": str(args.tree or treeserve.REPO),
        "stalled_stream_s": args.stall_s if stall else None,
        "half_open": args.half_open,
        "non_reading": args.non_reading,
        "max_concurrent_analyses": args.max_analyses,
    }
    _log(f"server from {r['tree']}")
    server = treeserve.start_server(args.tree, model, args.slide_root, workdir, *extra)
    bad = None
    try:
        _log("warm-up")
        measure(
            server.target,
            argparse.Namespace(**{**vars(args), "repeats": 2, "analyses": 1, "pace_s": 0}),
        )
        _log("idle")
        r["idle"] = measure(server.target, args)
        _log(f"opening {args.half_open} half-open calls and {args.non_reading} non-reading streams")
        hold_s = args.admission_wait_s + 600
        bad = BadClients(server.target, args.half_open, args.non_reading, hold_s)
        r["non_reading_at_open"] = bad.settle(expect_open=args.max_analyses)
        _log(f"non-reading streams: {r['non_reading_at_open']}; loaded health and GetModelInfo")
        r["loaded"] = measure(server.target, args, analyses=False)
        r["loaded"]["non_reading"] = bad.non_reading_state()
        _log("waiting for an analysis slot")
        r["slot_free"] = wait_for_admission(server.target, args, bad.t_open_silent)
        if r["slot_free"]["admitted_after_s"] is not None:
            _log("half-open calls still open: health, GetModelInfo, analyses")
            r["after"] = measure(server.target, args)
        r["half_open_ended_early"] = bad.half_open_done()
        r["non_reading_at_end"] = bad.non_reading_state()
        stalled = stalled_records(audit_path)
        r["stalled_records"] = len(stalled)
        r["stalled_held_s"] = sorted(round(x["duration_s"], 2) for x in stalled)
    finally:
        if bad is not None:
            bad.close()
        r["server_stop"] = server.stop()
    units = {"health": "median_ms", "model_info": "median_ms", "analysis": "median_s"}
    for phase in ("loaded", "after"):
        for kind, unit in units.items():
            idle = r["idle"][kind][unit]
            other = r.get(phase, {}).get(kind, {}).get(unit)
            r[f"ratio_{kind}_{phase}"] = round(other / idle, 3) if idle and other else None
    return r


def _fmt_calls(c: dict[str, Any]) -> str:
    s = "none completed" if c["median_ms"] is None else f"{c['median_ms']:.2f} ms (n={c['n']})"
    if c["timeouts"]:
        s += f", {c['timeouts']} timed out at {c['timeout_s']:g} s"
    if c["errors"]:
        s += f", {c['errors']} errors"
    return s


def _ratio(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "n/a"


def _slot_line(r: dict[str, Any]) -> str:
    slot = r["slot_free"]
    if slot["admitted_after_s"] is not None:
        s = f"{slot['admitted_after_s']:.2f} s after opening the non-reading streams"
    else:
        waited = slot.get("gave_up_after_s")
        s = f"no ({slot['error']}" + (f" within {waited:g} s)" if waited else ")")
    limit = r["stalled_stream_s"]
    s += f"; {slot['busy_replies']} SERVER_BUSY replies before; stall limit "
    return s + (f"{limit:g} s" if limit is not None else "none (no such flag)")


def table(r: dict[str, Any]) -> str:
    """The figures as aligned text, one row per measure."""
    idle, loaded, after = r["idle"], r["loaded"], r.get("after", {})
    rows = [
        ("server code", r["tree"]),
        ("bad calls", f"{r['half_open']} half-open + {r['non_reading']} non-reading"),
        ("non-reading at open", json.dumps(r["non_reading_at_open"])),
        ("phases", "idle | loaded: all bad calls open | after: slots free, half-open open"),
    ]
    for key, label in (("health", "health Check"), ("model_info", "GetModelInfo")):
        line = f"idle {_fmt_calls(idle[key])} | loaded {_fmt_calls(loaded[key])}"
        line += f" | after {_fmt_calls(after[key])}" if key in after else " | after -"
        line += f" | ratios {_ratio(r[f'ratio_{key}_loaded'])}, {_ratio(r[f'ratio_{key}_after'])}"
        rows.append((label, line))
    ia, aa = idle["analysis"], after.get("analysis")
    after_a = f"{aa['median_s']:.2f} s {aa['runs_s']}" if aa else "never admitted"
    rows += [
        (
            "AnalyzeSlide",
            f"idle {ia['median_s']:.2f} s {ia['runs_s']} | after {after_a}"
            f" | ratio {_ratio(r['ratio_analysis_after'])}",
        ),
        ("slot free", _slot_line(r)),
        ("STREAM_STALLED audit", f"{r['stalled_records']} records, held {r['stalled_held_s']} s"),
        ("non-reading at end", json.dumps(r["non_reading_at_end"])),
        ("half-open ended early", str(r["half_open_ended_early"])),
        ("server stop", r["server_stop"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="code tree of the server (default: this one)")
    parser.add_argument("--model", type=Path, help="exported artifact (default: export one)")
    parser.add_argument("--slide-root", type=Path, default=SLIDES)
    parser.add_argument("--slide", default=SLIDE, help="analysed slide, relative to the root")
    parser.add_argument("--half-open", type=int, default=200)
    parser.add_argument("--non-reading", type=int, default=50)
    parser.add_argument("--stall-s", type=float, default=10.0)
    parser.add_argument("--max-analyses", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="health/GetModelInfo calls")
    parser.add_argument("--analyses", type=int, default=1, help="timed analyses per phase")
    parser.add_argument(
        "--pace-s", type=float, default=0.2, help="one health + GetModelInfo pair this often"
    )
    parser.add_argument("--call-timeout-s", type=float, default=5.0)
    parser.add_argument("--analysis-timeout-s", type=float, default=300.0)
    parser.add_argument("--admission-wait-s", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hh-starvation-") as tmp:
        r = run(args, Path(tmp))
    r["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(table(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
