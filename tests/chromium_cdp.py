"""A headless Chromium driven over the DevTools protocol on a pipe, standard library only.

Chromium started with ``--remote-debugging-pipe`` reads protocol messages from fd 3 and
writes them to fd 4, each a JSON object ended by a NUL byte (the transport Puppeteer's
``pipe: true`` uses). That needs no websocket client and no Playwright (a ~45 MB wheel
with its own Node.js driver), only the Debian ``chromium`` binary that ``.ci/run``
installs. Used by the report tests; also a command for the closing note's screenshots::

    python tests/chromium_cdp.py out/report.html shots/report.png

Protocol reference: https://chromedevtools.github.io/devtools-protocol/ (Target, Page,
Runtime, Log, Network, Input, Emulation domains).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM_ENV = "HISTOHELPER_CHROMIUM"
DEFAULT_TIMEOUT_S = 60.0


def find_chromium() -> str | None:
    """The Chromium binary: ``$HISTOHELPER_CHROMIUM``, else ``chromium`` /
    ``chromium-browser`` / ``google-chrome`` on PATH, else None."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CDPError(RuntimeError):
    """The browser answered a command with an error, or did not answer in time."""


class Browser:
    """One headless Chromium process and its protocol pipe; use as a context manager."""

    def __init__(self, binary: str, *, width: int = 1400, height: int = 1000) -> None:
        self._profile = tempfile.mkdtemp(prefix="histohelper-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on its fd 3 and writes replies on its fd 4. bash (dash
        # takes single-digit fds only) moves our pipe ends there from fds >= 10, so the
        # moves cannot clobber each other, and execs Chromium: no preexec_fn in this
        # threaded process.
        r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        flags = [
            "--headless",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.insert(0, "--no-sandbox")  # Chromium refuses to run as root without it
        script = f'exec "$0" "$@" about:blank 3<&{r} 4>&{w} {r}<&- {w}>&-'
        self.log_path = Path(self._profile) / "chromium.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [shutil.which("bash") or "/bin/bash", "-c", script, binary, *flags],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(r, w),
            )
        os.close(r)
        os.close(w)
        self._next_id = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # --- transport ------------------------------------------------------------------

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self._changed:
                    self._closed = True
                    self._changed.notify_all()
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._changed:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._changed.notify_all()

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Send one command; return its ``result``.

        Raises:
            CDPError: an error reply, the browser exited, or no reply within ``timeout``.
        """
        with self._lock:
            self._next_id += 1
            call_id = self._next_id
        msg: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        try:
            os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            raise CDPError(f"{method}: the browser exited\n{self.log_tail()}") from None
        deadline = time.monotonic() + timeout
        with self._changed:
            while call_id not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "the browser exited" if self._closed else "timeout"
                    raise CDPError(f"{method}: no reply ({why})\n{self.log_tail()}")
                self._changed.wait(left)
            reply = self._replies.pop(call_id)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of Chromium's own output (stdout and stderr)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_event(
        self,
        method: str,
        *,
        session: str | None = None,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """The first event ``method`` (of ``session``) at index >= ``since`` in
        :attr:`events` that satisfies ``where``.

        Raises:
            CDPError: none arrives within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for ev in self.events[since:]:
                    if ev.get("method") != method:
                        continue
                    if session is not None and ev.get("sessionId") != session:
                        continue
                    if where is None or where(ev):
                        return ev
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise CDPError(f"no {method} event")
                self._changed.wait(left)

    # --- pages ----------------------------------------------------------------------

    def new_page(self) -> Page:
        """A new tab with Page, Runtime, Log and Network events enabled."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        return page

    def close(self) -> None:
        """Close the browser (Browser.close, then terminate) and remove its profile."""
        try:
            if self.process.poll() is None and not self._closed:
                self.send("Browser.close", timeout=10)
        except CDPError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab (a flattened target session)."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        self._start = len(browser.events)

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session)

    def goto(self, url: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Navigate and wait for the load event (all images loaded or failed)."""
        self._start = len(self.browser.events)
        reply = self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise CDPError(f"navigation failed: {reply['errorText']}")
        self.browser.wait_event(
            "Page.loadEventFired", session=self.session, since=self._start, timeout=timeout
        )

    def _events(self, method: str) -> list[dict[str, Any]]:
        return [
            ev
            for ev in self.browser.events[self._start :]
            if ev.get("method") == method and ev.get("sessionId") == self.session
        ]

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (CSP violations,
        failed loads) since the last navigation."""
        out = []
        for ev in self._events("Runtime.consoleAPICalled"):
            if ev["params"]["type"] in ("error", "assert"):
                out.append(
                    " ".join(
                        str(a.get("value", a.get("description"))) for a in ev["params"]["args"]
                    )
                )
        for ev in self._events("Runtime.exceptionThrown"):
            out.append(str(ev["params"]["exceptionDetails"].get("text")))
        for ev in self._events("Log.entryAdded"):
            entry = ev["params"]["entry"]
            if entry.get("level") == "error":
                out.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
        return out

    def failed_requests(self) -> list[str]:
        """Requests that failed, answered 4xx/5xx, or left the page's own file and
        ``data:`` URIs, since the last navigation."""
        out = []
        for ev in self._events("Network.loadingFailed"):
            out.append(f"failed: {ev['params'].get('errorText')} ({ev['params'].get('requestId')})")
        for ev in self._events("Network.responseReceived"):
            status = int(ev["params"]["response"].get("status") or 0)
            if status >= 400:
                out.append(f"HTTP {status}: {ev['params']['response'].get('url')}")
        for ev in self._events("Network.requestWillBeSent"):
            url = str(ev["params"]["request"].get("url", ""))
            if not url.startswith(("file:", "data:")):
                out.append(f"external request: {url}")
        return out

    def dialogs(self) -> list[str]:
        """JavaScript dialogs (alert, confirm) opened since the last navigation."""
        return [
            ev["params"].get("message", "") for ev in self._events("Page.javascriptDialogOpening")
        ]

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page; return its value (JSON-serialisable).

        Raises:
            CDPError: the expression threw.
        """
        reply = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in reply:
            raise CDPError(f"script threw: {reply['exceptionDetails'].get('text')}")
        return reply["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the first element
        matching ``selector``, scrolled into view."""
        box = self.evaluate(
            "(() => { const e = document.querySelector(" + json.dumps(selector) + ");"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()"
        )
        if box is None:
            raise CDPError(f"no element matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    def follow(self, selector: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Click the element (a link) and wait for the page it opens to load; the event
        lists then start at that navigation."""
        start = len(self.browser.events)
        self.click(selector)
        self.browser.wait_event(
            "Page.loadEventFired", session=self.session, since=start, timeout=timeout
        )
        self._start = start

    def screenshot(self, path: str | os.PathLike[str], *, full_page: bool = True) -> Path:
        """Write a PNG screenshot (the whole page by default). Returns the path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": max(1, int(size["width"])),
                "height": max(1, int(size["height"])),
                "scale": 1,
            }
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        return out


def main(argv: list[str]) -> int:
    """``chromium_cdp.py PAGE.html OUT.png``: load a local page headless, print its
    console errors and failed requests, write a full-page screenshot."""
    if len(argv) != 2:
        print("usage: chromium_cdp.py PAGE.html OUT.png", file=sys.stderr)
        return 2
    binary = find_chromium()
    if binary is None:
        print("no Chromium binary (set HISTOHELPER_CHROMIUM)", file=sys.stderr)
        return 1
    with Browser(binary) as browser:
        page = browser.new_page()
        page.goto(Path(argv[0]).resolve().as_uri())
        problems = page.console_errors() + page.failed_requests()
        for line in problems:
            print(line)
        print(page.screenshot(argv[1]))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
