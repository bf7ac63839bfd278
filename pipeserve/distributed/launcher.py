"""Starting stage processes, on the head machine and on worker machines (`pipeserve worker`).

Every rank is a `python -m pipeserve.worker.main` process that connects to the engine's control
listener (an authenticated multiprocessing connection; the key travels on stdin). On the head the engine
starts its node's ranks itself. On another machine a node agent (`pipeserve worker --node-rank K`, see
node_agent.py) stays connected for the engine's whole life and starts (or kills) ranks whenever asked.
Every child is started from one long-lived thread and dies with its parent (`die_with_parent`).

Ranks are placed by "TP inside a node, PP across nodes": node k hosts ranks [k*W/N, (k+1)*W/N), and
since TP groups are consecutive ranks, a TP group never spans machines when T divides W/N.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Client, Connection
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def control_address(master_addr: str, master_port: int | None, nnodes: int) -> tuple[str, int]:
    """Where the engine listens for ranks: any free loopback port alone, master_port + 1 across machines."""
    if nnodes == 1:
        return "127.0.0.1", 0
    return master_addr, master_port + 1


def ranks_of_node(node_rank: int, world_size: int, nnodes: int) -> list[int]:
    per_node = world_size // nnodes
    return list(range(node_rank * per_node, (node_rank + 1) * per_node))


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


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it exits (Linux), and exit now if
    that already happened: a child must never outlive the engine or node agent that owns it."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request above took effect
        os._exit(1)


def name_process(name: str) -> None:
    """Set this process's name as `ps` and /proc/PID/comm show it (Linux; at most 15 bytes kept), so a
    stage process is recognizable whether it was spawned or forked from the `pipeserve` command."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_name = 15
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_name, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def interface_towards(addr: str) -> str | None:
    """The network interface whose route reaches `addr` (None for loopback or when unknown)."""
    try:
        target = ipaddress.IPv4Address(socket.gethostbyname(addr))
    except (OSError, ValueError):
        return None
    if target.is_loopback:
        return None
    best: tuple[int, str] | None = None
    try:
        with open("/proc/net/route") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    for iface, dest, _gw, _flags, _ref, _use, _metric, mask, *_ in rows:
        dest_ip = ipaddress.IPv4Address(int(dest, 16).to_bytes(4, "little"))
        mask_ip = ipaddress.IPv4Address(int(mask, 16).to_bytes(4, "little"))
        net = ipaddress.IPv4Network(f"{dest_ip}/{mask_ip}", strict=False)
        if target in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, iface)
    return best[1] if best else None


def connect_to_head(address: tuple[str, int], authkey: bytes, timeout_s: float) -> Connection:
    """Connect to the engine's control listener, retrying until `timeout_s`; a clear error after that."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return Client(address, authkey=authkey)
        except (ConnectionRefusedError, OSError) as exc:
            last_error = exc
            time.sleep(0.5)
    raise ConnectionError(f"could not reach the head at {address[0]}:{address[1]} within {timeout_s:.0f} s "
                          f"({last_error}); is `pipeserve ... --nnodes N --node-rank 0` running there, and is the "
                          f"address reachable from this machine?")
