"""One process per (pipeline stage, TP rank), on this machine and, with `pipeserve worker`, on others.

Rank processes are started as `python -m pipeserve.worker.main` and connect back to the engine over an
authenticated multiprocessing connection (pickle: trusted processes only). The engine sends every step
plan to every rank, in issue order; activations flow stage to stage through torch.distributed; the last
stage's StepOutput comes back over its connection. A reader thread resolves the engine's futures and
watches every connection: an error message or a dead process fails all waiting steps with an error that
names the stage, and the remaining processes are torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import subprocess
import threading
import time
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

from pipeserve.config import EngineConfig
from pipeserve.distributed.launcher import control_address, free_port, ranks_of_node, spawn_rank
from pipeserve.distributed.stage import StageInfo
from pipeserve.executor.base import Executor
from pipeserve.types import SchedulerOutput, StepOutput
from pipeserve.worker.worker import WorkerSpec

logger = logging.getLogger(__name__)


class StageFailure(RuntimeError):
    """A pipeline stage raised or died; the message names the stage and the cause."""


class MultiprocExecutor(Executor):
    """Starts one process per stage and routes steps and results between them and the engine."""

    def __init__(self, config: EngineConfig, stages: list[StageInfo], startup_timeout_s: float = 600.0):
        par = config.parallel
        init_method = f"tcp://{par.master_addr}:{par.master_port or free_port(par.master_addr)}"
        tp = par.tensor_parallel_size
        world = len(stages) * tp
        self.specs = [WorkerSpec(config, stages[r // tp], r, world, init_method) for r in range(world)]
        self.tp_size = tp
        self.procs: dict[int, subprocess.Popen] = {}  # the ranks this machine started
        self.conns: list[Connection] = []
        self._pending: dict[tuple[int, int], tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._stats: queue.Queue = queue.Queue()
        self._busy: dict[int, float] = {}  # rank -> compute seconds, as last reported (about once a second)
        self.failure: StageFailure | None = None
        self._closed = False
        try:
            self._launch(startup_timeout_s)
            self.stage_params = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self._reader = threading.Thread(target=self._read_loop, name="pipeserve-results", daemon=True)
        self._reader.start()

    def who(self, rank: int) -> str:
        """A rank as a person reads it: its pipeline stage, and its TP rank where there is TP."""
        stage = self.specs[rank].stage.rank
        if self.tp_size == 1:
            return f"pipeline stage {stage}"
        return f"pipeline stage {stage} (TP rank {rank % self.tp_size}, global rank {rank})"

    # ---- start-up ------------------------------------------------------------------------------------

    def _launch(self, timeout_s: float) -> None:
        par = self.specs[0].config.parallel
        authkey = par.cluster_key.encode() if par.cluster_key else secrets.token_bytes(32)
        listener = Listener(control_address(par.master_addr, par.master_port, par.nnodes), authkey=authkey)
        for rank in ranks_of_node(0, len(self.specs), par.nnodes):
            self.procs[rank] = spawn_rank(listener.address, rank, authkey, par.master_addr)
        try:
            by_rank = self._accept_all(listener, par.join_timeout_s)
        finally:
            listener.close()
        self.conns = [by_rank[r] for r in range(len(self.specs))]
        for spec, conn in zip(self.specs, self.conns, strict=True):
            conn.send(("spec", spec))

    def _accept_all(self, listener: Listener, timeout_s: float) -> dict[int, Connection]:
        """Accept every rank's connection; node agents of other machines are told which ranks they host."""
        by_rank: dict[int, Connection] = {}
        nnodes = self.specs[0].config.parallel.nnodes

        def accept() -> None:
            while len(by_rank) < len(self.specs):
                try:
                    conn = listener.accept()
                except (OSError, EOFError):
                    continue  # a stranger without the key, or a dropped attempt: keep listening
                kind, value = conn.recv()
                if kind == "node":
                    conn.send(("ranks", ranks_of_node(value, len(self.specs), nnodes)))
                    conn.close()
                else:
                    by_rank[value] = conn

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(timeout=0.2)
            for rank, proc in self.procs.items():
                if proc.poll() is not None and rank not in by_rank:
                    raise StageFailure(f"{self.who(rank)} exited with code {proc.returncode} before connecting")
        if thread.is_alive():
            missing = sorted(set(range(len(self.specs))) - set(by_rank))
            nodes = sorted({r // (len(self.specs) // nnodes) for r in missing})
            raise StageFailure(f"ranks {missing} (node {', '.join(map(str, nodes))}) did not join within "
                               f"{timeout_s:.0f} s" + (": start `pipeserve worker` there" if nodes != [0] else ""))
        return by_rank

    def _wait_ready(self, timeout_s: float) -> list[int]:
        params: dict[int, int] = {}
        deadline = time.monotonic() + timeout_s
        while len(params) < len(self.conns):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(len(self.conns))) - set(params))
                raise StageFailure(f"ranks {missing} did not start within {timeout_s:.0f} s")
            for conn in wait(self.conns, timeout=remaining):
                msg = self._recv(conn)
                if msg[0] == "error":
                    raise StageFailure(f"{self.who(msg[1])} failed to start: {msg[2]}")
                params[msg[1]] = msg[2]
        return [params[r] for r in range(len(self.conns))]

    def _recv(self, conn: Connection) -> tuple:
        """A message from a stage; a closed connection means the stage process is gone."""
        try:
            return conn.recv()
        except (EOFError, OSError):
            rank = self.conns.index(conn)
            proc = self.procs.get(rank)
            if proc is None:
                raise StageFailure(f"{self.who(rank)} on another machine closed its connection") from None
            with contextlib.suppress(subprocess.TimeoutExpired):  # give the exit code a moment to appear
                proc.wait(timeout=2)
            code = proc.returncode
            raise StageFailure(f"{self.who(rank)} (pid {proc.pid}) died"
                               + (f" with exit code {code}" if code is not None else "")) from None

    # ---- steps ---------------------------------------------------------------------------------------

    async def execute(self, sched: SchedulerOutput) -> StepOutput:
        if self.failure is not None:
            raise self.failure
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._pending[(sched.virtual_engine, sched.step_id)] = (loop, future)
        msg = ("step", sched)
        for conn in self.conns:  # same order to every stage: that is what keeps send/recv pairs matched
            conn.send(msg)
        return await future

    def _read_loop(self) -> None:
        while not self._closed:
            try:
                for conn in wait(self.conns, timeout=0.5):
                    self._dispatch(self._recv(conn))
            except StageFailure as exc:
                if not self._closed:
                    self._fail(exc)
                return
            except OSError:
                return  # connections closed by shutdown

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "result":
            step: StepOutput = msg[1]
            with self._lock:
                loop, future = self._pending.pop((step.virtual_engine, step.step_id))
            loop.call_soon_threadsafe(_set_result, future, step)
        elif kind == "stats":
            self._stats.put(msg[1])
        elif kind == "busy":
            self._busy[msg[1]] = msg[2]
        elif kind == "error":
            raise StageFailure(f"{self.who(msg[1])} failed: {msg[2]}")

    def _fail(self, exc: StageFailure) -> None:
        logger.error("%s", exc)
        self.failure = exc
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, future in pending.values():
            loop.call_soon_threadsafe(_set_exception, future, exc)
        self._terminate()

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure
        for rank, proc in self.procs.items():
            if proc.poll() is not None:
                raise StageFailure(f"{self.who(rank)} is not running (exit code {proc.returncode})")

    def busy_seconds(self) -> list[float]:
        """Compute seconds per pipeline stage (its TP rank 0), as last reported by the stage processes."""
        return [self._busy.get(stage * self.tp_size, 0.0) for stage in range(len(self.specs) // self.tp_size)]

    def collect_stats(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Per-stage step records, bytes sent and parameter counts; call while no step is in flight."""
        for conn in self.conns:
            conn.send(("stats", None))
        stats = [self._stats.get(timeout=timeout_s) for _ in self.conns]
        return sorted(stats, key=lambda s: s["rank"])

    # ---- teardown ------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):  # a rank that is already gone needs no stop
                conn.send(("stop", None))
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # stragglers are terminated just below
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._terminate()
        for conn in self.conns:
            conn.close()

    def _terminate(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
