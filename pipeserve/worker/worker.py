"""One stage's step execution, shared by both executors: forward pass, hand-off, step records, busy time.

The in-process executor (PP=1) runs a StageWorker directly; a stage process (rank_process.py) runs one per
rank and adds the process group, the control connection and recovery around it.
"""

from __future__ import annotations

import os
import resource
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeserve.config import EngineConfig
from pipeserve.distributed.comm import StageLink
from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.distributed.rank_layout import RankLayout
from pipeserve.distributed.stage import StageInfo
from pipeserve.layers.linear import NO_TP
from pipeserve.timeline import BusyClock, StepRecord
from pipeserve.types import IntermediateTensors, MemoryProfile, SchedulerOutput, StepOutput
from pipeserve.worker.allocator import fix_mmap_threshold
from pipeserve.worker.memory_profile import profile_memory
from pipeserve.worker.model_runner import ModelRunner
from pipeserve.worker.request_states import RequestStates
from pipeserve.worker.sampled_ids import PendingStep
from pipeserve.worker.step_inputs import rows_for

MAX_RECORDS = 200_000  # step records kept for a trace or benchmark (EngineConfig.record_steps): bounded all the same
FEED_MAX_RECORDS = 4096  # records waiting for the live feed's next batch (bounded if nobody drains them)


@dataclass(frozen=True)
class WorkerSpec:
    """What a stage process needs to start (picklable). The engine hosts the rendezvous store."""

    config: EngineConfig
    stage: StageInfo
    rank: int
    layout: RankLayout
    store_addr: str
    store_port: int


class StageWorker:
    """Runs one stage's steps (as one TP rank of it). `link` is None when the stage is the whole model."""

    def __init__(self, config: EngineConfig, stage: StageInfo, rank: int = 0, tp: TPGroup = NO_TP):
        self.config, self.stage, self.rank, self.tp = config, stage, rank, tp
        # Before any tensor exists: per-step tensors of ever-changing sizes must not grow the heap (allocator.py).
        self.mmap_threshold = fix_mmap_threshold()
        self.runner = ModelRunner(
            config.model, stage, num_blocks_per_ve=config.num_blocks_per_ve, block_size=config.cache.block_size,
            num_virtual_engines=config.num_virtual_engines, max_model_len=config.scheduler.max_model_len,
            seed=config.seed, device=config.parallel.device, disable_progress=rank != 0, tp=tp,
            max_num_seqs=config.scheduler.max_num_seqs, enforce_eager=config.enforce_eager,
            time_gpu=config.record_steps,
            keep_sampled_ids=config.scheduler.async_scheduling and stage.is_first and stage.is_last and tp.size == 1,
        )
        layout = RankLayout(stage.size, tp.size)
        self.link = StageLink(layout.prev_peer(rank), layout.next_peer(rank), tp)
        self.requests = RequestStates()
        self.records: deque[StepRecord] = deque(maxlen=MAX_RECORDS if config.record_steps else 0)
        self._compute_s = 0.0  # cumulative compute seconds of synchronous steps (records are bounded; this is not)
        # With async scheduling a step's call returns once its work is queued: the stage counts each step from
        # issue until its tokens reach the host instead, as the union of those spans (steps overlap).
        self._in_flight = BusyClock() if self.holds_sampled_ids else None
        self.feed: deque[StepRecord] | None = None  # records for the live feed, only while someone watches
        self.memory_profile: MemoryProfile | None = None  # set when the engine sized the KV pool by profiling

    def profile_memory(self, before_measuring: Callable[[], None] | None = None) -> MemoryProfile:
        """Profile this rank's memory for the engine's KV sizing (CUDA, before the KV pool exists)."""
        if torch.device(self.config.parallel.device).type != "cuda":
            raise ValueError("only a CUDA stage profiles its memory: a CPU stage's KV pool is sized by "
                             "kv_cache_memory_gb / num_kv_blocks")
        if self.runner.kv_caches:
            raise RuntimeError("the KV pool is already allocated: profile before allocate_kv")
        self.memory_profile = profile_memory(self.runner, self.config.scheduler.max_num_batched_tokens,
                                             before_measuring)
        return self.memory_profile

    def allocate_kv(self, num_blocks_per_ve: int) -> None:
        """Allocate the KV pool the engine decided on (and capture the graphs over it)."""
        self.runner.allocate_kv(num_blocks_per_ve)

    def weights_summary(self) -> str:
        return getattr(self.runner.model, "weights_summary", "")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.runner.model.parameters())  # shared (tied) tensors count once

    @property
    def holds_sampled_ids(self) -> bool:
        """Whether this stage feeds the ids it samples to the next step on the device (sampled_ids.py)."""
        return self.runner.sampled_ids is not None

    @property
    def busy_s(self) -> float:
        """Seconds this stage has spent on steps, since start."""
        return self._compute_s if self._in_flight is None else self._in_flight.seconds()

    def run_step(self, plan: SchedulerOutput, generation: int = 0, defer: bool = False
                 ) -> StepOutput | PendingStep | None:
        """Receive (unless first), compute, send (unless last); the StepOutput when this rank answers (with
        `defer`, a step that samples answers a PendingStep: its tokens are still on their way to the host).

        The plan is incremental; it is resolved against what this stage keeps of each request. After a
        recovery some tokens are recomputed only up to the replaced stage (`for_stage`): a stage receives just
        the rows it computes and sends on just the rows the next stage computes."""
        cfg = self.config.model
        sched = self.requests.resolve(plan, generation)  # every stage keeps every request's state
        mine = sched.for_stage(self.stage.rank)
        if mine.is_empty:  # every token of the step is catch-up work for earlier stages
            return StepOutput(sched.step_id, sched.virtual_engine) if self.runner.samples else None
        inter = None
        if not self.stage.is_first:
            inter = self.link.recv(mine.num_tokens, cfg.hidden_size, cfg.torch_dtype, self.config.parallel.device)
        if self._in_flight is None:
            out = self.runner.execute(mine, inter, self.requests.batch, defer)
            self._compute_s += self.runner.last_record.end - self.runner.last_record.start
        else:
            out = self._issue(mine, inter, defer)
        record = self.runner.last_record
        self.records.append(record)
        feed = self.feed  # (read once: the in-process executor's event loop may switch it off meanwhile)
        if feed is not None:
            feed.append(record)
        if not self.stage.is_last:
            following = sched.for_stage(self.stage.rank + 1)
            if not following.is_empty:
                rows = rows_for(mine, following)
                self.link.send(out if rows is None else IntermediateTensors(out.hidden_states[rows],
                                                                            out.residual[rows]))
            return None
        return out if self.runner.samples else None

    def watch_steps(self, on: bool) -> None:
        """Keep step records for the live feed (drained by whoever watches) or stop keeping them."""
        if not on:
            self.feed = None
        elif self.feed is None:
            self.feed = deque(maxlen=FEED_MAX_RECORDS)

    def drain_feed(self) -> tuple[StepRecord, ...]:
        """The records kept for the feed since the last call (appends come from the step thread: popleft is
        atomic, so nothing is lost or taken twice)."""
        feed, out = self.feed, []
        while feed:
            out.append(feed.popleft())
        return tuple(out)

    def _issue(self, mine: SchedulerOutput, inter: IntermediateTensors | None, defer: bool
               ) -> IntermediateTensors | StepOutput | PendingStep:
        """Execute with async scheduling: the step counts as busy until its tokens are on the host."""
        clock = self._in_flight
        clock.step_started()
        try:
            out = self.runner.execute(mine, inter, self.requests.batch, defer)
        except BaseException:
            clock.step_ended()
            raise
        if isinstance(out, PendingStep):
            out.when_done(clock.step_ended)  # on the executor's waiter thread, as the tokens arrive
        else:
            clock.step_ended()
        return out

    def stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "stage": self.stage.rank, "tp_rank": self.tp.rank,
                "records": list(self.records), "bytes_sent": self.link.bytes_sent,
                "num_params": self.num_params(), "requests_held": len(self.requests),
                "malloc_mmap_threshold": self.mmap_threshold, **self.memory(), **self.graph_stats(),
                "memory_profile": None if self.memory_profile is None else asdict(self.memory_profile)}

    def graph_stats(self) -> dict[str, Any]:
        """CUDA graph sizes, count, capture seconds and memory, and decode steps replayed (none when the stage
        runs eagerly); with step records on a GPU, each step's span on it (gpu_timeline.py)."""
        graphs, timeline = self.runner.graphs, self.runner.gpu_timeline
        out = graphs.stats() if graphs is not None else {}
        if timeline is not None:  # waits for the last step's work: collect while no step is in flight
            out["gpu_spans"] = timeline.spans()
        return out

    def memory(self) -> dict[str, int]:
        """Bytes of this process: its weights, its KV pool, resident now and at peak (Linux accounting)."""
        model = self.runner.model
        weights = sum(t.numel() * t.element_size() for t in model.parameters())  # a tied matrix counts once
        weights += sum(m.quantized.nbytes for m in model.modules() if getattr(m, "quantized", None) is not None)
        kv = sum(t.numel() * t.element_size() for caches in self.runner.kv_caches for t in caches)
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"weights_bytes": weights, "kv_bytes": kv, "rss_bytes": rss, "peak_rss_bytes": peak}
