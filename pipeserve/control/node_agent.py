"""`pipeserve worker`: a machine's node agent. It hosts that machine's ranks for the head's engine.

The agent connects to the engine's control listener and stays connected for the engine's whole life: the
engine asks it to start ranks at start-up and again whenever one of them must be replaced (StartRanks), or
to kill a stuck one (KillRanks). Its ranks die with it (parent-death signal). When the head goes away
without a Stop (it crashed, or a supervisor is restarting it), the agent kills its ranks and reconnects to
the new head for up to `--connect-timeout` seconds; a Stop ends it with exit code 0.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from multiprocessing.connection import Client, Connection

from pipeserve.control.launcher import control_address, spawn_rank
from pipeserve.control.messages import KillRanks, NodeHello, StartRanks, Stop


class NodeAgent:
    """Starts and kills this machine's ranks as the engine asks."""

    def __init__(self, master_addr: str, master_port: int, node_rank: int, cluster_key: str):
        self.address = control_address(master_addr, master_port, nnodes=2)
        self.master_addr, self.node_rank = master_addr, node_rank
        self.authkey = cluster_key.encode()
        self.procs: dict[int, subprocess.Popen] = {}

    def run(self, connect_timeout_s: float) -> int:
        """Serve heads until one says Stop (exit 0); 1 when no head comes back within the timeout."""
        while True:
            conn = connect_to_head(self.address, self.authkey, connect_timeout_s)  # raises ConnectionError
            conn.send(NodeHello(self.node_rank, os.getpid(), socket.gethostname()))
            print(f"pipeserve worker: node {self.node_rank} connected to the head at {self.address[0]}", flush=True)
            stopped = self._serve(conn)
            self.kill(list(self.procs))
            if stopped:
                return 0
            print("pipeserve worker: the head went away; waiting for it to come back", flush=True)

    def _serve(self, conn) -> bool:
        """Handle the head's requests; True after a Stop, False when the connection drops."""
        try:
            while True:
                msg = conn.recv()
                if isinstance(msg, StartRanks):
                    self.start(msg.ranks)
                elif isinstance(msg, KillRanks):
                    self.kill(msg.ranks)
                elif isinstance(msg, Stop):
                    self._wait_ranks(timeout_s=15)
                    return True
        except (EOFError, OSError):
            return False
        finally:
            conn.close()

    def start(self, ranks: tuple[int, ...]) -> None:
        self.kill(ranks)  # a rank being replaced must not linger beside its replacement
        for r in ranks:
            self.procs[r] = spawn_rank(self.address, r, self.authkey, self.master_addr)
        print(f"pipeserve worker: node {self.node_rank} started ranks {list(ranks)}", flush=True)

    def kill(self, ranks) -> None:
        for r in list(ranks):
            proc = self.procs.pop(r, None)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    def _wait_ranks(self, timeout_s: float) -> None:
        """After a Stop the ranks finish their sends and exit on their own; give them a moment."""
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # stragglers are killed by the caller
                proc.wait(timeout=timeout_s)


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


def run_node_agent(master_addr: str, master_port: int, node_rank: int, cluster_key: str,
                   timeout_s: float = 60.0) -> int:
    return NodeAgent(master_addr, master_port, node_rank, cluster_key).run(timeout_s)
