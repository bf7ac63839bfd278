"""The life of a rank process: load the stage, join the group, run steps, and survive a peer's death.

Two threads share the engine connection. The control thread reads every message: it answers Ping at once
(so the engine can tell a busy rank from a stuck one), exits the process the moment the connection closes
(the engine is gone: never an orphan), and queues everything else for the main thread, which computes.

A failed torch.distributed operation (PeerLost: a peer died or dropped the group) does not end the rank:
it drops its group, reports GroupLost, skips the rest of that generation's steps, and on Join enters the
next generation's group with its weights still loaded. Any other exception is the rank's own failure: it
reports StageError and exits, and the engine starts a replacement.

While the engine has the live step feed on (WatchSteps: a dashboard page is open), the main thread sends the
stage's step records in StepRecords batches every FEED_EVERY_S, also between steps; otherwise it keeps none.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from pipeserve.control.messages import (
    AllocateKV,
    BusyReport,
    GroupLost,
    Join,
    KVAllocated,
    Loaded,
    MemoryProfiled,
    Ping,
    Pong,
    ProfileMemory,
    Ready,
    Release,
    Released,
    RunStep,
    StageError,
    StartStage,
    StatsReply,
    StatsRequest,
    StepRecords,
    StepResult,
    Stop,
    WatchSteps,
)
from pipeserve.distributed.parallel_state import PeerLost, init_tp_groups, tp_group_of
from pipeserve.worker.worker import StageWorker, WorkerSpec

BUSY_REPORT_EVERY_S = 1.0  # how often a rank tells the engine its cumulative compute time (for /metrics)
FEED_EVERY_S = 0.2  # while the live feed is on, step records go to the engine in batches this often


logger = logging.getLogger(__name__)

class ControlChannel:
    """The rank's connection to the engine: a reader thread, an inbox for the main thread, locked sends."""

    def __init__(self, conn: Connection, rank: int):
        self.conn, self.rank, self.generation = conn, rank, -1
        self.inbox: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name="pipeserve-control", daemon=True).start()

    def send(self, msg: object) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def _read(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                if isinstance(msg, Ping):
                    self.send(Pong(self.rank, msg.nonce, self.generation, time.time()))
                else:
                    self.inbox.put(msg)
        except BaseException:  # noqa: BLE001 - the engine is gone (EOF, reset): nobody to compute for
            os._exit(0)


def choose_backend(device: str, ranks_per_node: int) -> str:
    """NCCL when every rank of a machine has a GPU of its own; gloo otherwise. NCCL refuses two ranks on one
    device, so ranks sharing a GPU hand activations over through host memory (see comm.host_staged)."""
    if not device.startswith("cuda"):
        return "gloo"
    gpus = torch.cuda.device_count()
    if gpus >= ranks_per_node:
        return "nccl"
    logger.warning("%d ranks share %d GPU(s) on this machine: NCCL cannot run two ranks on one device, so "
                   "stages exchange activations through host memory over gloo", ranks_per_node, gpus)
    return "gloo"


class RankProcess:
    """One rank: its stage's weights, its place in the current generation's group, and the step loop."""

    def __init__(self, channel: ControlChannel, start: StartStage):
        spec: WorkerSpec = start.spec
        self.channel, self.spec = channel, spec
        cfg = spec.config
        torch.set_num_threads(cfg.parallel.threads_per_worker or 1)
        self.layout = spec.layout
        self.backend = choose_backend(cfg.parallel.device, self.layout.ranks_per_node)
        if cfg.parallel.device.startswith("cuda"):
            torch.cuda.set_device(spec.rank % torch.cuda.device_count())
        self.timeout = datetime.timedelta(seconds=cfg.parallel.distributed_timeout_s)
        self.store = dist.TCPStore(spec.store_addr, spec.store_port, is_master=False, timeout=self.timeout)
        # Load, then wait for Join: a replacement still reading weights never holds the others in a rendezvous.
        self.worker = StageWorker(cfg, spec.stage, spec.rank, tp_group_of(self.layout, spec.rank))
        self.in_group = False
        self._last_feed = 0.0  # when the live step feed last sent a batch
        channel.send(Loaded(spec.rank, start.generation, self.worker.num_params(), self.worker.weights_summary()))

    @property
    def generation(self) -> int:
        """The group generation this rank belongs to (-1 before its first Join); the control thread stamps
        its Pongs with it too."""
        return self.channel.generation

    def join(self, generation: int) -> None:
        """Form `generation`'s group: a fresh rendezvous under its own store prefix, so nothing of an older
        group can pair with this one."""
        store = dist.PrefixStore(f"generation{generation}/", self.store)
        dist.init_process_group(self.backend, store=store, rank=self.spec.rank, world_size=self.layout.world_size,
                                timeout=self.timeout)
        init_tp_groups(self.layout, self.spec.rank, into=self.worker.tp)
        self.channel.generation = generation
        self.in_group = True
        self.channel.send(Ready(self.spec.rank, generation, self.worker.num_params()))

    def leave(self) -> None:
        """Drop the current group, if any; closing its connections also frees any peer blocked on this rank."""
        if not self.in_group:
            return
        self.in_group = False
        self.worker.link.drop_sends()
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group may complain on the way down
                dist.destroy_process_group()

    def serve(self) -> None:
        """Run messages until Stop; PeerLost leaves the group and waits for Release and Join."""
        last_report = 0.0
        while True:
            if self.worker.feed is None:
                msg = self.channel.inbox.get()  # no feed: nothing to do between messages
            else:
                try:
                    msg = self.channel.inbox.get(timeout=FEED_EVERY_S)
                except queue.Empty:
                    self._send_feed(time.time())  # an idle stage still sends its last steps
                    continue
            if isinstance(msg, RunStep):
                if msg.generation != self.generation or not self.in_group:
                    continue  # a step of a group that is gone: the engine recomputes it
                try:
                    out = self.worker.run_step(msg.sched, msg.generation)
                except PeerLost as exc:
                    self.leave()
                    self.channel.send(GroupLost(self.spec.rank, self.generation, str(exc)))
                    continue
                if out is not None:
                    self.channel.send(StepResult(out, self.generation))
                now = time.time()
                if now - last_report >= BUSY_REPORT_EVERY_S:
                    last_report = now
                    self.channel.send(BusyReport(self.spec.rank, self.worker.busy_s, self.generation))
                if self.worker.feed is not None and now - self._last_feed >= FEED_EVERY_S:
                    self._send_feed(now)
            elif isinstance(msg, WatchSteps):
                if not msg.on and self.worker.feed is not None:
                    self._send_feed(time.time())
                self.worker.watch_steps(msg.on)
            elif isinstance(msg, Release):
                self.leave()
                self.channel.send(Released(self.spec.rank, msg.generation))
            elif isinstance(msg, Join):
                self.leave()
                self.join(msg.generation)
            elif isinstance(msg, ProfileMemory):
                # Ranks sharing a GPU (gloo: see choose_backend) read its memory once all have profiled.
                barrier = dist.barrier if self.backend == "gloo" else None
                profile = self.worker.profile_memory(barrier)
                self.channel.send(MemoryProfiled(self.spec.rank, msg.generation, profile))
            elif isinstance(msg, AllocateKV):
                self.worker.allocate_kv(msg.num_blocks_per_ve)
                self.channel.send(KVAllocated(self.spec.rank, msg.generation))
            elif isinstance(msg, StatsRequest):
                if self.in_group:
                    self.worker.link.wait_sends()
                self.channel.send(StatsReply(self.spec.rank, self.worker.stats(), self.generation))
            elif isinstance(msg, Stop):
                if self.in_group:
                    with contextlib.suppress(PeerLost):  # the next stage may already be gone
                        self.worker.link.wait_sends()
                return
            else:
                raise TypeError(f"unexpected message {type(msg).__name__}")


    def _send_feed(self, now: float) -> None:
        self._last_feed = now
        records = self.worker.drain_feed()
        if records:
            self.channel.send(StepRecords(self.spec.rank, records, self.generation))


def run_rank(conn: Connection, rank: int) -> None:
    """Process entry point: wait for StartStage, then serve; every failure is reported before exiting."""
    channel = ControlChannel(conn, rank)
    try:
        start = channel.inbox.get()
        if not isinstance(start, StartStage):
            raise TypeError(f"expected StartStage, got {type(start).__name__}")
        RankProcess(channel, start).serve()
    except KeyboardInterrupt:
        pass  # (a Ray actor's process; pipeserve's own stage processes ignore SIGINT): the engine stops it
    except BaseException as exc:  # report, never die silently
        cause = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        with contextlib.suppress(OSError, EOFError, ValueError):  # the engine may already be gone
            channel.send(StageError(rank, channel.generation, cause, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
