"""Starting `pipeserve serve` as a subprocess for tests, and reading its /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pipeserve.control.process import free_port


@dataclass
class ServerProcess:
    """A running server: its URL, process, log file and API key."""

    url: str
    proc: subprocess.Popen
    log: Path
    api_key: str | None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model: str, log: Path, args: list[str], api_key: str | None = None,
                 timeout_s: float = 120.0) -> ServerProcess:
    """Start the server on a free port and wait until /health answers 200."""
    port = free_port()
    # The `pipeserve` command's own entry: with -pp/-tp its stage processes are forked before the engine starts.
    cmd = [sys.executable, "-m", "pipeserve.entrypoints.launch", "serve", model, "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PIPESERVE_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log, api_key)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"the server did not become healthy in {timeout_s:.0f} s:\n{server.log_text()[-4000:]}")


def read_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_sum(metrics: dict, name: str, **labels: str) -> float:
    """The sum of `name` over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in metrics.items() if n == name and want <= set(lbl))


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc: no psutil needed)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def wait_all_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """Wait up to `timeout_s` for every process to be gone; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]
