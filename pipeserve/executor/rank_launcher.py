"""Where rank processes come from: one interface over "this machine" and "another machine's node agent".

The executor asks for ranks by number and never cares how they start: node 0's ranks are child processes
of the engine; node k's ranks are started by that machine's `pipeserve worker`, which stays connected for
the engine's whole life. The Ray backend (a Ray actor per rank, ray_launcher.py) implements the same calls.
"""

from __future__ import annotations

import abc
import contextlib
import subprocess
import threading
import time
from multiprocessing.connection import Connection

from pipeserve.control.launcher import spawn_rank
from pipeserve.control.messages import KillRanks, StartRanks
from pipeserve.distributed.rank_layout import RankLayout


class NodeAgentMissing(RuntimeError):
    """A machine's `pipeserve worker` is not connected, so its ranks cannot be started."""

    def __init__(self, node: int, ranks: list[int], waited_s: float):
        super().__init__(f"ranks {ranks} (node {node}) did not join within {waited_s:.0f} s: start "
                         f"`pipeserve worker --node-rank {node}` there")
        self.node, self.ranks = node, ranks


class RankLauncher(abc.ABC):
    """Starts and kills rank processes, says where a rank lives, and hosts the node agents' connections.

    Everything the executor and the group formation ask of a backend; the mp backend's ClusterLauncher and
    the Ray backend's RayLauncher implement all of it.
    """

    @abc.abstractmethod
    def start(self, ranks: list[int], generation: int, deadline: float) -> None:
        """Start these ranks (each connects to the engine); raise RuntimeError if they cannot be started."""

    @abc.abstractmethod
    def kill(self, ranks: list[int], generation: int) -> None:
        """Kill these ranks if they still run (a stuck process, or one being replaced)."""

    @abc.abstractmethod
    def exit_code(self, rank: int, wait_s: float = 0.0) -> int | None:
        """The exit code of a rank this launcher started, waiting up to `wait_s` for it to appear; None while
        it runs, or where it is not observable (a node agent's rank)."""

    @abc.abstractmethod
    def pid(self, rank: int) -> int | None:
        """The process id of a rank while it runs (on the machine `where` names); None before it started,
        once it has exited, or where it is not observable (a node agent's rank)."""

    @abc.abstractmethod
    def where(self, rank: int) -> str:
        """The machine of a rank, as a person reads it."""

    @abc.abstractmethod
    def not_joined(self, ranks: list[int], waited_s: float) -> str:
        """The error for ranks that were started but never connected: where they were to run, and what may
        bring them."""

    @abc.abstractmethod
    def agent_connected(self, node: int, conn: Connection, host: str) -> None:
        """A machine's `pipeserve worker` connected (introduced itself with a NodeHello)."""

    @abc.abstractmethod
    def agent_lost(self, node: int, conn: Connection) -> None:
        """That agent's connection closed."""

    @abc.abstractmethod
    def agent_connections(self) -> dict[int, Connection]:
        """The connected agents' connections, by node rank (the executor reads them and sends Stop)."""

    @abc.abstractmethod
    def close(self, grace_s: float = 10.0) -> None:
        """After every rank was told to Stop: wait up to `grace_s` for them to end, then kill what is left and
        release whatever the launcher holds."""


class ClusterLauncher(RankLauncher):
    """Node 0's ranks as local child processes; node k's through node k's agent."""

    def __init__(self, engine_address: tuple[str, int], authkey: bytes, master_addr: str, layout: RankLayout,
                 node_rejoin_timeout_s: float):
        self.engine_address, self.authkey, self.master_addr = engine_address, authkey, master_addr
        self.layout = layout
        self.node_rejoin_timeout_s = node_rejoin_timeout_s
        self._procs: dict[int, subprocess.Popen] = {}  # node 0's ranks
        self.agents: dict[int, Connection] = {}  # node rank -> its agent's connection
        self.hosts: dict[int, str] = {}  # node rank -> the host name its agent reported
        self._agents_changed = threading.Condition()

    def where(self, rank: int) -> str:
        node = self.layout.node_of(rank)
        if node == 0:
            proc = self._procs.get(rank)
            return "the head node" + (f", pid {proc.pid}" if proc else "")
        return f"node {node}" + (f" ({self.hosts[node]})" if node in self.hosts else "")

    def not_joined(self, ranks: list[int], waited_s: float) -> str:
        nodes = sorted({self.layout.node_of(r) for r in ranks})
        hint = ": start `pipeserve worker` there" if nodes != [0] else ""
        return f"ranks {ranks} (node {', '.join(map(str, nodes))}) did not join within {waited_s:.0f} s{hint}"

    # ---- node agents ---------------------------------------------------------------------------------

    def agent_connected(self, node: int, conn: Connection, host: str) -> None:
        with self._agents_changed:
            self.hosts[node] = host
            old = self.agents.pop(node, None)
            if old is not None:
                with contextlib.suppress(OSError):
                    old.close()
            self.agents[node] = conn
            self._agents_changed.notify_all()

    def agent_lost(self, node: int, conn: Connection) -> None:
        with self._agents_changed:
            if self.agents.get(node) is conn:
                del self.agents[node]

    def agent_connections(self) -> dict[int, Connection]:
        with self._agents_changed:
            return dict(self.agents)

    def _agent(self, node: int, ranks: list[int], deadline: float) -> Connection:
        """Node `node`'s agent, waiting for it to (re)connect until `deadline`."""
        start = time.monotonic()
        with self._agents_changed:
            while node not in self.agents:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NodeAgentMissing(node, ranks, time.monotonic() - start)
                self._agents_changed.wait(min(remaining, 0.5))
            return self.agents[node]

    # ---- ranks ---------------------------------------------------------------------------------------

    def start(self, ranks: list[int], generation: int, deadline: float) -> None:
        by_node: dict[int, list[int]] = {}
        for r in ranks:
            by_node.setdefault(self.layout.node_of(r), []).append(r)
        for node, node_ranks in sorted(by_node.items()):
            if node == 0:
                for r in node_ranks:
                    self._procs[r] = spawn_rank(self.engine_address, r, self.authkey, self.master_addr)
            else:
                agent_deadline = min(deadline, time.monotonic() + self.node_rejoin_timeout_s)
                try:
                    self._agent(node, node_ranks, agent_deadline).send(StartRanks(tuple(node_ranks), generation))
                except OSError as exc:  # the agent went away just now: its ranks are gone with it
                    raise RuntimeError(f"could not reach node {node}'s `pipeserve worker`: {exc}") from None

    def kill(self, ranks: list[int], generation: int) -> None:
        remote: dict[int, list[int]] = {}
        for r in ranks:
            proc = self._procs.get(r)
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            elif self.layout.node_of(r) != 0:
                remote.setdefault(self.layout.node_of(r), []).append(r)
        for node, node_ranks in remote.items():
            conn = self.agent_connections().get(node)
            if conn is not None:
                with contextlib.suppress(OSError):  # an agent that is gone took its ranks with it
                    conn.send(KillRanks(tuple(node_ranks), generation))

    def exit_code(self, rank: int, wait_s: float = 0.0) -> int | None:
        proc = self._procs.get(rank)
        if proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):  # still running, or not yet reaped
            proc.wait(timeout=wait_s)
        return proc.returncode

    def pid(self, rank: int) -> int | None:
        proc = self._procs.get(rank)
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self, grace_s: float = 10.0) -> None:
        """Node 0's ranks: wait up to `grace_s` for them to exit, then terminate and kill what is left (node
        k's agent ends its own ranks on Stop)."""
        deadline = time.monotonic() + grace_s
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # stragglers are terminated just below
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
