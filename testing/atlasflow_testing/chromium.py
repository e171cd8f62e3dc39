"""A real headless Chromium driven over the DevTools protocol, for checking pages as a browser renders them.

Started on 127.0.0.1 with its own profile folder, stopped by its PID; needs Debian's ``chromium``
(:func:`ensure_chromium` installs it with apt when running as root, as CI does).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from atlasflow_testing.local_airflow import free_port

__all__ = ["Chromium", "ensure_chromium"]


def ensure_chromium() -> str | None:
    """Path of the chromium binary, installing Debian's package when root; None when unavailable."""
    found = shutil.which("chromium")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)
    return shutil.which("chromium")


class Chromium:
    """``with Chromium() as browser: browser.open(url); browser.text()``."""

    def __init__(self, binary: str = "chromium", *, port: int | None = None, width: int = 1400,
                 height: int = 1000) -> None:
        self.binary, self.port, self.size = binary, port or free_port(), (width, height)
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None
        self._ws_context: Any = None
        self._profile = ""

    def __enter__(self) -> Chromium:
        from websockets.sync.client import connect

        self._profile = tempfile.mkdtemp(prefix="atlasflow-chromium-")
        self._proc = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={self._profile}", "--remote-debugging-address=127.0.0.1",
             f"--remote-debugging-port={self.port}", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    page = next(t for t in json.load(r) if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.time() > deadline or self._proc.poll() is not None:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"chromium did not open its DevTools port {self.port}") from None
                time.sleep(0.3)
        self._ws_context = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20)
        self._ws = self._ws_context.__enter__()
        self.call("Page.enable")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ws_context is not None:
            self._ws_context.__exit__(None, None, None)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # our own child, by its PID
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; events that arrive meanwhile are dropped."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def set_cookie(self, url: str, name: str, value: str) -> None:
        self.call("Network.setCookie", url=url, name=name, value=value, httpOnly=True)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """Poll a JavaScript expression until it is truthy (pages of the React UI render late)."""
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.time() > deadline:
                return value
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
