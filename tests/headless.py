"""Headless Chromium for the report test: Debian's `chromium`, driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages ending in NUL on file descriptors 3 and 4), so no websocket client or
browser download is needed. Also runnable: `python tests/headless.py report.html [shot.png [page.pdf]]`."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Flags for a root user in a container without a display, GPU or network.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)


def install_chromium() -> str | None:
    """Debian's package when it is missing and we may install it (root with apt-get, as CI runs); else None."""
    found = find_chromium()
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    return find_chromium()


class Chromium:
    """One headless browser; `page_report` loads a page and says what a user's browser would."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 60):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="fusechat-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire() -> None:  # in the child: the browser reads fd 3, writes fd 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [
                binary,
                *FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=wire,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    # ------------------------------------------------------------------ protocol
    def _read(self) -> dict[str, Any]:
        deadline = time.time() + self.timeout
        while b"\0" not in self._buffer:
            if time.time() > deadline:
                raise TimeoutError("no message from chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise EOFError(f"chromium exited (rc {self.proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.events.append(self._read())
        raise TimeoutError(f"no {method} event")

    # ------------------------------------------------------------------ a page
    def page_report(self, path: Path, screenshot: Path | None = None, pdf: Path | None = None) -> dict[str, Any]:
        """Load `path`; return the console errors, uncaught exceptions, browser log errors, every requested URL,
        the section ids and, per image, whether it decoded and its natural and shown size. Optionally a full-page
        PNG, and the page printed to PDF (A4) with its page count."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", {}, session)
        self.events.clear()
        self.send("Page.navigate", {"url": path.resolve().as_uri()}, session)
        self.wait_for("Page.loadEventFired")
        probe = """(async () => {
            const images = [...document.images];
            await Promise.all(images.map(i => i.decode().then(() => true, () => false)));
            const decoded = await Promise.all(images.map(i => i.decode().then(() => true, () => false)));
            return {
              sections: [...document.querySelectorAll('section[id]')].map(s => ({id: s.id,
                heading: (s.querySelector('h2') || {}).textContent || '', text: s.innerText.length,
                notes: [...s.querySelectorAll('.note')].map(n => n.textContent)})),
              images: images.map((i, k) => ({alt: i.alt, decoded: decoded[k], complete: i.complete,
                width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width})),
              scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
              height: document.documentElement.scrollHeight,
            };
        })()"""
        page = self.send(
            "Runtime.evaluate", {"expression": probe, "awaitPromise": True, "returnByValue": True}, session
        )["result"]["value"]
        if screenshot is not None:
            shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        if pdf is not None:
            printed = self.send("Page.printToPDF", {"paperWidth": 8.27, "paperHeight": 11.69}, session)
            pdf.write_bytes(base64.b64decode(printed["data"]))
            page["pdf_pages"] = len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf.read_bytes()))
        events = [e for e in self.events if e.get("sessionId") == session]
        page["console_errors"] = [
            e["params"]
            for e in events
            if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
        ]
        page["exceptions"] = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
        page["log_errors"] = [
            e["params"]["entry"]
            for e in events
            if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]
        page["requests"] = [
            e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"
        ]
        page["failed_requests"] = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
        self.send("Target.closeTarget", {"targetId": target})
        return page


if __name__ == "__main__":
    binary = find_chromium() or sys.exit("chromium not found")
    with Chromium(binary) as browser:
        found = browser.page_report(
            Path(sys.argv[1]),
            Path(sys.argv[2]) if len(sys.argv) > 2 else None,
            Path(sys.argv[3]) if len(sys.argv) > 3 else None,
        )
    print(json.dumps({k: v for k, v in found.items()}, indent=1)[:6000])
