"""Starting stage processes, on the head machine and on worker machines (`pipeserve worker`).

Every rank is a `python -m pipeserve.worker.main` process that connects to the engine's control
listener (an authenticated multiprocessing connection; the key travels on stdin). On the head the engine
starts its node's ranks itself. On another machine a node agent (`pipeserve worker --node-rank K`, see
node_agent.py) stays connected for the engine's whole life and starts (or kills) ranks whenever asked.
Every child is started from one long-lived thread and dies with its parent (`process.die_with_parent`).
Which machine hosts which rank is `distributed/rank_layout.RankLayout.node_of`.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from pipeserve.control.process import interface_towards


def control_address(master_addr: str, master_port: int | None, nnodes: int) -> tuple[str, int]:
    """Where the engine listens for ranks: any free loopback port alone, master_port + 1 across machines."""
    if nnodes == 1:
        return "127.0.0.1", 0
    return master_addr, master_port + 1


class _Spawner:
    """Starts child processes from one thread that lives as long as this process.

    A child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG, see worker/main.py). The
    kernel fires that signal when the *thread* that forked the child exits, not the process: a rank started
    from a short-lived recovery thread would be killed as soon as that thread ended. So every spawn runs here.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pipeserve-spawner", daemon=True)
                self._thread.start()
        result: Future = Future()
        self._jobs.put((argv, kwargs, result))
        return result.result()

    def _run(self) -> None:
        while True:
            argv, kwargs, result = self._jobs.get()
            try:
                result.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as exc:  # handed to the caller, who raises it
                result.set_exception(exc)


_SPAWNER = _Spawner()
# Stage processes started before the engine knew its address (`prewarm_ranks`): each has imported torch and
# the model code and waits on its stdin (or pipe, when forked) for "HOST:PORT RANK KEY".
_WARM: list[subprocess.Popen] = []
_WARM_LOCK = threading.Lock()


def prewarm_ranks(count: int) -> None:
    """Start `count` stage processes now, to be given their rank and the engine's address later.

    Importing torch takes seconds of CPU per process. On Linux the caller has imported torch and the
    model code already, and the stage processes are forked from it: they share those pages and import
    nothing. Elsewhere they are started as fresh interpreters that import while the engine does. Only for
    ranks on this machine; unclaimed ones die with this process or in `discard_warm_ranks`."""
    if hasattr(os, "fork") and threading.active_count() == 1:  # forking is safe only before any thread
        procs = [_fork_rank() for _ in range(count)]
    else:
        procs = [_SPAWNER.popen([sys.executable, "-m", "pipeserve.worker.main", "--await-assignment"],
                                stdin=subprocess.PIPE) for _ in range(count)]
    with _WARM_LOCK:
        _WARM.extend(procs)


class ForkedRank:
    """A forked stage process, with the part of `subprocess.Popen`'s interface the launcher uses."""

    def __init__(self, pid: int, stdin: Any):
        self.pid, self.stdin, self.returncode = pid, stdin, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"stage process {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _fork_rank() -> ForkedRank:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the stage process: wait for its assignment, serve, and never return into the CLI
        code = 1
        try:
            os.close(write_fd)
            from pipeserve.worker.main import serve_assignment

            with os.fdopen(read_fd) as assignment:
                serve_assignment(assignment)
            code = 0
        except BaseException:  # noqa: BLE001 - reported here: os._exit below skips the usual printing
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(read_fd)
    return ForkedRank(pid, os.fdopen(write_fd, "wb"))


def discard_warm_ranks() -> None:
    with _WARM_LOCK:
        procs, _WARM[:] = list(_WARM), []
    for proc in procs:
        proc.kill()


def _claim_warm() -> subprocess.Popen | None:
    with _WARM_LOCK:
        while _WARM:
            proc = _WARM.pop(0)
            if proc.poll() is None:
                return proc
    return None


def spawn_rank(engine: tuple[str, int], rank: int, authkey: bytes, master_addr: str) -> subprocess.Popen:
    """Start one stage process that will connect to the engine at `engine` (a prewarmed one if any)."""
    iface = interface_towards(master_addr)
    warm = _claim_warm() if iface is None else None  # prewarmed ones have this process's environment
    if warm is not None:
        warm.stdin.write(f"{engine[0]}:{engine[1]} {rank} {authkey.hex()}\n".encode())
        warm.stdin.close()
        return warm
    env = dict(os.environ)
    if iface:  # gloo binds to the hostname's address unless told which interface reaches the other hosts
        env["GLOO_SOCKET_IFNAME"] = iface
    proc = _SPAWNER.popen([sys.executable, "-m", "pipeserve.worker.main", "--engine", f"{engine[0]}:{engine[1]}",
                           "--rank", str(rank)], stdin=subprocess.PIPE, env=env)
    proc.stdin.write(authkey.hex().encode() + b"\n")
    proc.stdin.close()
    return proc
