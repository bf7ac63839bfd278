"""One process per (pipeline stage, TP rank), on this machine and, with `pipeserve worker`, on others.

Rank processes connect to the engine's control listener (authenticated multiprocessing connections:
pickle, trusted processes only), which stays open for the engine's whole life so that replacements and
returning node agents can connect. The engine hosts the rendezvous store; each generation of the process
group rendezvouses under its own prefix. Every step plan goes to every rank in issue order; activations
flow stage to stage through torch.distributed; the last stage's StepOutput comes back over its connection.

A monitor thread reads every connection and watches the step deadline. A failure (a closed connection,
a StageError, a GroupLost, or no result within --step-timeout-s) interrupts every step in flight (the
virtual engines recompute their requests) and a recovery thread forms the next generation
(formation.py). Past --max-stage-restarts, or when a replacement cannot start, the failure is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

from pipeserve.config import EngineConfig
from pipeserve.control.launcher import control_address, discard_warm_ranks
from pipeserve.control.messages import (
    AllocateKV,
    BusyReport,
    GroupLost,
    KVAllocated,
    Loaded,
    MemoryProfiled,
    NodeHello,
    Pong,
    ProfileMemory,
    RankHello,
    Ready,
    Released,
    RunStep,
    StageError,
    StatsReply,
    StatsRequest,
    StepRecords,
    StepResult,
    Stop,
)
from pipeserve.distributed.rank_layout import RankLayout
from pipeserve.distributed.stage import StageInfo
from pipeserve.executor.base import Executor, StepInterrupted
from pipeserve.executor.control_listener import ControlListener, host_store
from pipeserve.executor.formation import FormationInterrupted, GroupFormation, StageFailure
from pipeserve.executor.rank_launcher import ClusterLauncher, RankLauncher
from pipeserve.executor.rank_table import RankTable
from pipeserve.executor.recovery_log import RecoveryLog, RecoverySpan, RestartBudget
from pipeserve.executor.step_feed import RankStepFeed
from pipeserve.types import MemoryProfile, SchedulerOutput, StepOutput
from pipeserve.worker.worker import WorkerSpec

logger = logging.getLogger(__name__)

__all__ = ["MultiprocExecutor", "StageFailure"]

WARMUP_STEPS = 4  # the first steps of a generation may be slow (lazy allocation, caches): a longer deadline
WARMUP_FACTOR = 5.0
# A rank that lost a peer is usually the echo of that peer's own failure, whose report (it raised, or its
# connection closed) travels on another connection and can arrive a moment later: wait this long for it, so
# the failure names its cause rather than the echo.
ECHO_GRACE_S = 1.0


class MultiprocExecutor(Executor):
    """Starts one process per rank, routes steps and results, and heals the pipeline when a rank fails."""

    def __init__(self, config: EngineConfig, stages: list[StageInfo]):
        par = config.parallel
        self.config, self.layout = config, RankLayout(len(stages), par.tensor_parallel_size, par.nnodes)
        world = self.layout.world_size
        master_addr, listen = par.master_addr, control_address(par.master_addr, par.master_port, par.nnodes)
        if par.distributed_executor_backend == "ray":
            from pipeserve.executor.ray_launcher import connect_ray

            master_addr = connect_ray(par.ray_address, par.master_addr)
            listen = (master_addr, 0)  # the actors may run on other machines: listen where they can reach
        self.store = host_store(master_addr, par.master_port, par.distributed_timeout_s)
        self.specs = [WorkerSpec(config, stages[self.layout.stage_of(r)], r, self.layout, master_addr,
                                 self.store.port) for r in range(world)]
        self.table = RankTable(world)
        self.generation = 0
        self.state = "starting"  # starting, running, recovering, failed, closed
        self.failure: StageFailure | None = None
        self.recoveries = RecoveryLog()
        self._restarts = RestartBudget(par.max_stage_restarts, par.restart_window_s)
        self._pending: dict[tuple[int, int], tuple[asyncio.AbstractEventLoop, asyncio.Future, float, int]] = {}
        self._steps_issued = itertools.count()
        self._stats: queue.Queue = queue.Queue()
        self._busy: dict[int, float] = {}
        self._sizing: dict[int, object] = {}  # rank -> its answer in the KV sizing handshake (kv_sizing.py)
        self._echo: tuple[float, int, str] | None = None  # a lost peer's report: (deadline, generation, cause)
        self._closed = False
        authkey = par.cluster_key.encode() if par.cluster_key else secrets.token_bytes(32)
        self._listener = ControlListener(listen, authkey, world, self._rank_connected, self._agent_connected)
        self.launcher = self._launcher(authkey)
        self.formation = GroupFormation(self.table, self.launcher, self.specs, self.who, par.join_timeout_s)
        self.step_feed = RankStepFeed(self.layout, self.table.send)
        threading.Thread(target=self._monitor_loop, name="pipeserve-monitor", daemon=True).start()
        try:
            self.stage_params = self.formation.start_all(0)
            self.step_feed.joined(range(world), 0)
        except FormationInterrupted as exc:
            self.shutdown()
            raise StageFailure(str(exc)) from None
        except BaseException:
            self.shutdown()
            raise
        # Without a block count the ranks hold no KV pool yet: no step runs until the handshake has sized it.
        self.state = "running" if config.num_blocks_per_ve else "sizing"

    def _launcher(self, authkey: bytes) -> RankLauncher:
        par = self.config.parallel
        if par.distributed_executor_backend == "ray":
            from pipeserve.executor.ray_launcher import RayLauncher

            name = f"pipeserve-{socket.gethostname()}-{par.master_port or os.getpid()}"
            return RayLauncher(self._listener.address, authkey, self.layout,
                               cpus_per_rank=par.ray_cpus_per_rank,
                               gpus_per_rank=1.0 if par.device.startswith("cuda") else 0.0,
                               ready_timeout_s=par.join_timeout_s, name=name)
        return ClusterLauncher(self._listener.address, authkey, par.master_addr, self.layout,
                               par.node_rejoin_timeout_s)

    def where(self, stage: int) -> str:
        return self.launcher.where(self.layout.stage_ranks(stage)[0])

    def who(self, rank: int) -> str:
        """A rank as a person reads it: its pipeline stage, and its TP rank where there is TP."""
        stage = self.layout.stage_of(rank)
        if self.layout.tp_size == 1:
            return f"pipeline stage {stage}"
        return f"pipeline stage {stage} (TP rank {self.layout.tp_rank(rank)}, global rank {rank})"

    # ---- steps ---------------------------------------------------------------------------------------

    async def execute(self, sched: SchedulerOutput, generation: int | None = None) -> StepOutput:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.table.cv:
            if self.failure is not None:
                raise self.failure
            if self.state != "running" or generation not in (None, self.generation):
                raise StepInterrupted("planned before a stage failure", lost=False)
            self._pending[(sched.virtual_engine, sched.step_id)] = (loop, future, time.monotonic(),
                                                                    next(self._steps_issued))
            msg = ForkingPickler.dumps(RunStep(sched, self.generation))  # once, whatever the number of ranks
            conns = [self.table.conns.get(r) for r in range(self.table.world_size)]
        with self.table.send_lock:  # one global order to every rank: that is what keeps send/recv pairs matched
            for conn in conns:
                if conn is not None:
                    with contextlib.suppress(OSError, ValueError):  # a dead rank: the monitor starts recovery
                        conn.send_bytes(msg)  # what conn.send(RunStep) sends: the rank's recv() unpickles it
        return await future

    # ---- the KV sizing handshake (start-up, when the block count is decided from device memory) -----------

    def profile_memory(self) -> list[MemoryProfile]:
        answers = self._ask_every_rank(ProfileMemory(self.generation), "profile its memory")
        return [answers[r].profile for r in range(self.table.world_size)]

    def allocate_kv(self, num_blocks_per_ve: int) -> None:
        """Every rank allocates; a replacement started later gets the count in its spec (no handshake)."""
        self.config = replace(self.config, num_blocks_per_ve=num_blocks_per_ve)
        self.specs[:] = [replace(spec, config=self.config) for spec in self.specs]  # the formation's list too
        self._ask_every_rank(AllocateKV(num_blocks_per_ve, self.generation), "allocate its KV cache")
        with self.table.cv:
            self.state = "running"

    def _ask_every_rank(self, msg: object, what: str) -> dict[int, object]:
        t = self.table
        with t.cv:
            if self.state != "sizing":
                raise RuntimeError(f"the KV pool is sized once, at start (executor state {self.state!r})")
            self._sizing = {}
        for r in range(t.world_size):
            t.send(r, msg)
        deadline = time.monotonic() + self.config.parallel.join_timeout_s
        with t.cv:
            t.wait_for(lambda: len(self._sizing) == t.world_size, deadline, self._check_sizing)
            missing = [r for r in range(t.world_size) if r not in self._sizing]
            if missing:
                raise StageFailure(f"{self.who(missing[0])} did not {what} within "
                                   f"{self.config.parallel.join_timeout_s:.0f} s (--join-timeout-s)")
            return dict(self._sizing)

    def _check_sizing(self) -> None:
        if self.table.dead:
            rank, cause = next(iter(self.table.dead.items()))
            raise StageFailure(f"{self.who(rank)} on {self.launcher.where(rank)} failed while the KV cache was "
                               f"sized: {cause}")

    async def wait_ready(self) -> int:
        while True:
            if self.failure is not None:
                raise self.failure
            if self.state == "running":
                return self.generation
            await asyncio.sleep(0.05)

    @property
    def recovering(self) -> bool:
        return self.state == "recovering"

    # ---- the monitor: every message from every rank and agent ----------------------------------------

    def _rank_connected(self, hello: RankHello, conn: Connection) -> None:
        with self.table.cv:
            self.table.hellos[hello.rank] = conn
            self.table.cv.notify_all()

    def _agent_connected(self, hello: NodeHello, conn: Connection) -> None:
        logger.info("node %d's `pipeserve worker` connected (%s, pid %d)", hello.node_rank, hello.host, hello.pid)
        self.launcher.agent_connected(hello.node_rank, conn, hello.host)

    def _monitor_loop(self) -> None:
        while not self._closed:
            with self.table.cv:
                ranks = {conn: r for r, conn in self.table.conns.items()}
            agents = {conn: n for n, conn in self.launcher.agent_connections().items()}
            if not ranks and not agents:
                time.sleep(0.2)
                continue
            try:
                ready = wait(list(ranks) + list(agents), timeout=0.2)
            except OSError:
                continue  # a connection closed under us (a retired rank): take a fresh snapshot
            for conn in ready:
                if conn in agents:
                    self._agent_message(agents[conn], conn)
                else:
                    self._rank_message(ranks[conn], conn)
            self._check_echo()
            self._check_deadline()

    def _agent_message(self, node: int, conn: Connection) -> None:
        try:
            conn.recv()  # agents only speak when introduced; anything else is ignored
        except (EOFError, OSError):
            logger.error("node %d's `pipeserve worker` disconnected", node)
            self.launcher.agent_lost(node, conn)

    def _rank_message(self, rank: int, conn: Connection) -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            code = self.launcher.exit_code(rank, wait_s=1.0)  # a closed connection comes just before the exit
            cause = "died" + (f" with exit code {code}" if code is not None else " (its connection closed)")
            if self.table.mark_dead(rank, conn, cause):
                self._failed(f"{self.who(rank)} on {self.launcher.where(rank)} {cause}")
            return
        t = self.table
        if isinstance(msg, StepResult):
            if msg.generation == self.generation:
                self._resolve(msg.output)
        elif isinstance(msg, BusyReport):
            self._busy[rank] = msg.seconds
        elif isinstance(msg, StatsReply):
            self._stats.put(msg.stats)
        elif isinstance(msg, StepRecords):
            self.step_feed.received(rank, msg)
        elif isinstance(msg, Pong) and self.step_feed.is_clock_pong(msg):
            self.step_feed.pong(rank, msg)
        elif isinstance(msg, GroupLost):
            # the first report of this generation is held; one held from an older generation is stale
            if msg.generation == self.generation and (self._echo is None or self._echo[1] != msg.generation):
                cause = f"{self.who(rank)} lost a peer: {msg.cause}"
                self._echo = (time.monotonic() + ECHO_GRACE_S, msg.generation, cause)
        elif isinstance(msg, StageError):
            with t.cv:
                if rank not in t.ready:
                    t.start_errors[rank] = msg.cause
            t.mark_dead(rank, conn, f"raised {msg.cause}")
            logger.error("%s on %s raised:\n%s", self.who(rank), self.launcher.where(rank), msg.details)
            self._failed(f"{self.who(rank)} on {self.launcher.where(rank)} failed: {msg.cause}")
        else:
            with t.cv:
                if isinstance(msg, Loaded):
                    t.loaded[rank] = msg.num_params
                    if msg.weights:
                        logger.info("%s holds %s", self.who(rank), msg.weights)
                elif isinstance(msg, Released) and msg.generation == self.generation:
                    t.released.add(rank)
                elif isinstance(msg, Ready) and msg.generation == self.generation:
                    t.ready[rank] = msg.num_params
                elif isinstance(msg, Pong):
                    t.pongs[rank] = msg.nonce
                elif isinstance(msg, (MemoryProfiled, KVAllocated)) and msg.generation == self.generation:
                    self._sizing[rank] = msg
                t.cv.notify_all()

    def _resolve(self, step: StepOutput) -> None:
        with self.table.cv:
            entry = self._pending.pop((step.virtual_engine, step.step_id), None)
        if entry is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is gone (a generate() that ended early)
                entry[0].call_soon_threadsafe(_set_result, entry[1], step)

    def _check_echo(self) -> None:
        """A lost peer whose own failure was not reported within ECHO_GRACE_S is the failure (a link, a host)."""
        if self._echo is None or time.monotonic() < self._echo[0]:
            return
        _, generation, cause = self._echo
        self._echo = None
        if generation == self.generation:  # else a reported cause already started the recovery
            self._failed(cause)

    def _check_deadline(self) -> None:
        limit = self.config.parallel.step_timeout_s
        with self.table.cv:
            if self.state != "running" or not self._pending:
                return
            key, (_, _, issued, ordinal) = min(self._pending.items(), key=lambda kv: kv[1][2])
        allowed = limit * (WARMUP_FACTOR if ordinal < WARMUP_STEPS else 1.0)
        if time.monotonic() - issued > allowed:
            self._failed(f"step {key[1]} of virtual engine {key[0]} got no result within {allowed:.0f} s "
                         f"(--step-timeout-s): a stage is stuck")

    # ---- failure and recovery ------------------------------------------------------------------------

    def _failed(self, cause: str) -> None:
        """The first sign of a failure in a running generation starts a recovery; later ones are its echoes."""
        with self.table.cv:
            if self.state != "running" or self._closed:
                return
            self.state = "recovering"
            self.generation += 1
            pending, self._pending = self._pending, {}
        logger.error("pipeline failure: %s; recovering (generation %d)", cause, self.generation)
        _interrupt(pending, StepInterrupted(cause))
        threading.Thread(target=self._recover, args=(cause,), name="pipeserve-recovery", daemon=True).start()

    def _recover(self, cause: str) -> None:
        start = time.time()
        self.formation.started.clear()  # every rank started by any attempt of this recovery has lost its KV
        while True:
            if not self._restarts.take():
                par = self.config.parallel
                return self._give_up(f"{cause}; giving up after {par.max_stage_restarts} restarts within "
                                     f"{par.restart_window_s:.0f} s (--max-stage-restarts)")
            try:
                self.formation.reform(self.generation)
                break
            except FormationInterrupted as exc:
                if self._closed:
                    return
                cause = str(exc)
                logger.error("recovery interrupted: %s; trying again", cause)
                with self.table.cv:
                    self.generation += 1
            except Exception as exc:  # noqa: BLE001 - a replacement that cannot start: final
                return self._give_up(f"{cause}; recovery failed: {exc}")
        replaced = sorted(self.formation.started)
        stages = sorted({self.layout.stage_of(r) for r in replaced})
        self.recoveries.record(RecoverySpan(start, time.time(), cause, stages, self.generation))
        with self.table.cv:
            self.table.dead.clear()
            self._steps_issued = itertools.count()
            self.state = "running"
        self.step_feed.joined(replaced, self.generation)
        logger.warning("recovered in %.1f s: generation %d, replaced ranks %s", time.time() - start,
                       self.generation, replaced)

    def _give_up(self, reason: str) -> None:
        if self._closed:
            return
        failure = StageFailure(reason)
        logger.error("%s", failure)
        with self.table.cv:
            self.failure, self.state = failure, "failed"
            pending, self._pending = self._pending, {}
        _interrupt(pending, failure)
        self.launcher.kill(list(range(self.table.world_size)), self.generation)

    # ---- stats ---------------------------------------------------------------------------------------

    def busy_seconds(self) -> list[float]:
        """Compute seconds per pipeline stage (its TP rank 0), as last reported by the stage processes."""
        return [self._busy.get(self.layout.stage_ranks(stage)[0], 0.0) for stage in range(self.layout.pp_size)]

    def num_steps_pending(self) -> int:
        with self.table.cv:
            return len(self._pending)

    def collect_stats(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Per-stage step records, bytes sent and parameter counts; call while no step is in flight."""
        ranks = range(self.table.world_size)
        for r in ranks:
            self.table.send(r, StatsRequest(self.generation))
        stats = [self._stats.get(timeout=timeout_s) for _ in ranks]
        return sorted(stats, key=lambda s: s["rank"])

    # ---- teardown ------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state = "closed"
        for r in range(self.table.world_size):
            self.table.send(r, Stop(self.generation))
        for conn in self.launcher.agent_connections().values():
            with contextlib.suppress(OSError, ValueError):  # an agent that is gone needs no stop
                conn.send(Stop(self.generation))
        self.launcher.close()
        discard_warm_ranks()  # prewarmed stage processes this engine did not need
        with self.table.cv:
            conns = list(self.table.conns.values()) + list(self.table.hellos.values())
        for conn in conns + list(self.launcher.agent_connections().values()):
            conn.close()
        self._listener.close()
        self.store = None


def _interrupt(pending: dict, exc: BaseException) -> None:
    for loop, future, _, _ in pending.values():
        loop.call_soon_threadsafe(_set_exception, future, exc)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
