"""Load a report in headless Chromium and look at it: screenshot, broken images, sections, numbers.

Talks the DevTools protocol over `--remote-debugging-pipe` (NUL-separated JSON on file
descriptors 3 and 4), so it needs only the Chromium binary (Debian's `chromium` package) and the
standard library: no websocket client, no driver, nothing downloaded. The report itself has no
JavaScript; the only script here is the probe evaluated after the page has loaded.

Used by `wsi-pipe report --screenshot` and by the browser tests.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipe.core.errors import WsiPipeError
from wsi_pipe.core.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
)

#: evaluated in the page after load: waits for every image to decode, then reports
_PROBE = """
(async () => {
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  const q = s => [...document.querySelectorAll(s)];
  return {
    title: document.title,
    images: [...document.images].map(i => ({src: i.getAttribute('src').slice(0, 60),
      alt: i.alt, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
      complete: i.complete, shownWidth: i.getBoundingClientRect().width})),
    sections: q('section[data-section]').map(s => ({id: s.id,
      title: (s.querySelector('h2') || {}).innerText || '', height: s.getBoundingClientRect().height})),
    numbers: q('[data-src]').map(e => ({src: e.dataset.src, key: e.dataset.key, fmt: e.dataset.fmt,
      value: e.dataset.value, text: e.innerText})),
    scripts: document.scripts.length,
    width: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
  };
})()
"""


class BrowserError(WsiPipeError, RuntimeError):
    """Chromium is missing, failed to start, or did not answer in time."""


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary ($CHROMIUM, then the usual names on PATH), or None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


@dataclass
class PageReport:
    """What the browser saw: images, sections, traceable numbers, page size, screenshot path."""

    title: str
    images: list[dict[str, Any]]
    sections: list[dict[str, Any]]
    numbers: list[dict[str, Any]]
    scripts: int
    width: int
    height: int
    screenshot: Path | None = None
    console_errors: list[str] = field(default_factory=list)

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        """Images that did not load or decode (naturalWidth 0)."""
        return [i for i in self.images if not i["complete"] or i["naturalWidth"] <= 0]


class _Pipe:
    """A DevTools session over Chromium's debugging pipe."""

    def __init__(
        self, proc: subprocess.Popen[bytes], w: int, r: int, log_path: Path | None = None
    ) -> None:
        self.proc, self.w, self.r = proc, w, r
        self.log_path = log_path
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def stderr_tail(self) -> str:
        """The last lines Chromium wrote to stderr."""
        try:
            return (
                self.log_path.read_bytes().decode(errors="replace")[-800:] if self.log_path else ""
            )
        except OSError:
            return ""

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise BrowserError(
                        f"Chromium closed the debugging pipe (exit {self.proc.poll()}): "
                        f"{self.stderr_tail()}"
                    )
                self.buf += chunk
            elif self.proc.poll() is not None:
                raise BrowserError(
                    f"Chromium exited with code {self.proc.returncode}: {self.stderr_tail()}"
                )
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout_s: float = 60.0,
    ) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self.w, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError as e:
            raise BrowserError(
                f"Chromium is gone (exit {self.proc.poll()}): {self.stderr_tail()}"
            ) from e
        deadline = time.monotonic() + timeout_s
        while True:
            m = self._read_message(deadline)
            if m.get("id") == mid:
                if "error" in m:
                    raise BrowserError(f"{method}: {m['error'].get('message')}")
                return dict(m.get("result", {}))
            self.events.append(m)

    def wait_event(self, method: str, timeout_s: float = 60.0) -> dict[str, Any]:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout_s
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)


def _high_fd(fd: int) -> int:
    """A duplicate of `fd` numbered 10 or more (the original is closed)."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def inspect_page(
    html: str | Path,
    screenshot: str | Path | None = None,
    width: int = 1280,
    max_height: int = 16000,
    timeout_s: float = 90.0,
    chromium: str | None = None,
) -> PageReport:
    """Open `html` in headless Chromium; report its images, sections and numbers, and save a
    full-page PNG screenshot (at most `max_height` px tall) to `screenshot` when given.

    Raises BrowserError when no Chromium is found or it fails.
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise BrowserError("no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    url = Path(html).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="wsi-report-chromium-") as profile:
        cmd_r, cmd_w = os.pipe()  # we write commands, Chromium reads them on fd 3
        res_r, res_w = os.pipe()  # Chromium writes answers on fd 4
        # the child's ends are moved above 9 first, so bash's `3<&A 4>&B` cannot clobber them
        # (dash cannot redirect from fds above 9, hence bash)
        cmd_r, res_w = _high_fd(cmd_r), _high_fd(res_w)
        args = [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},900",
            "about:blank",
        ]
        log_path = Path(profile) / "chromium-stderr.log"
        log_fh = open(log_path, "wb")  # a file, not a pipe: a full pipe would block Chromium
        proc = subprocess.Popen(
            [
                shutil.which("bash") or "/bin/bash",
                "-c",
                f'exec "$0" "$@" 3<&{cmd_r} 4>&{res_w}',
                *args,
            ],
            pass_fds=(cmd_r, res_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fh,
        )
        os.close(cmd_r)
        os.close(res_w)
        pipe = _Pipe(proc, cmd_w, res_r, log_path)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout_s=timeout_s)
            sess = pipe.call(
                "Target.attachToTarget",
                {"targetId": target["targetId"], "flatten": True},
                timeout_s=timeout_s,
            )["sessionId"]
            pipe.call("Page.enable", session=sess)
            pipe.call("Runtime.enable", session=sess)
            pipe.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                sess,
            )
            pipe.call("Page.navigate", {"url": url}, sess, timeout_s=timeout_s)
            pipe.wait_event("Page.loadEventFired", timeout_s)
            out = pipe.call(
                "Runtime.evaluate",
                {"expression": _PROBE, "awaitPromise": True, "returnByValue": True},
                sess,
                timeout_s,
            )
            if "exceptionDetails" in out:
                raise BrowserError(f"page probe failed: {out['exceptionDetails']}")
            v = out["result"]["value"]
            errors = [
                str(e["params"].get("exceptionDetails", {}).get("text", ""))
                for e in pipe.events
                if e.get("method") == "Runtime.exceptionThrown"
            ]
            rep = PageReport(
                v["title"],
                v["images"],
                v["sections"],
                v["numbers"],
                int(v["scripts"]),
                int(v["width"]),
                int(v["height"]),
                console_errors=errors,
            )
            if screenshot is not None:
                h = min(int(v["height"]), max_height)
                pipe.call(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": width, "height": h, "deviceScaleFactor": 1, "mobile": False},
                    sess,
                )
                shot = pipe.call(
                    "Page.captureScreenshot",
                    {
                        "format": "png",
                        "captureBeyondViewport": True,
                        "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1},
                    },
                    sess,
                    timeout_s,
                )
                atomic_write_bytes(screenshot, base64.b64decode(shot["data"]))
                rep.screenshot = Path(screenshot)
            try:
                pipe.call("Browser.close", timeout_s=10)
            except BrowserError:
                pass
            return rep
        finally:
            os.close(cmd_w)
            os.close(res_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log_fh.close()
