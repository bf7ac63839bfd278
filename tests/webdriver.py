"""A headless Chromium driven over the W3C WebDriver protocol (Debian's `chromium` and `chromium-driver`), with
httpx: the few commands the dashboard's browser test needs, no other dependency."""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from pipeserve.control.process import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


class Browser:
    """One chromedriver process and one headless browser session."""

    def __init__(self, width: int = 1440, height: int = 900):
        if not (CHROMIUM and CHROMEDRIVER):
            raise RuntimeError("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
        port = free_port()
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(timeout=60)
        self.profile = tempfile.TemporaryDirectory(prefix="pipeserve-chromium-")
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get(f"{self.base}/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", f"--window-size={width},{height}",
                f"--user-data-dir={self.profile.name}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        r = self.http.request(method, self.base + path, json=body)
        value = r.json().get("value")
        if r.status_code != 200:
            raise RuntimeError(f"WebDriver {method} {path}: {r.status_code} {value}")
        return value

    def _session(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    @property
    def url(self) -> str:
        return self._session("GET", "/url")

    def run(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body; `return` its result) in the page."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))

    def close(self) -> None:
        if getattr(self, "session", None):
            try:
                self._session("DELETE", "")
            except (httpx.HTTPError, RuntimeError):
                pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.http.close()
        self.profile.cleanup()
