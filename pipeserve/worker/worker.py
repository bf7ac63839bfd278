"""The process of one pipeline stage: join the process group, load the stage, then run steps in order.

Steps arrive over a pipe from the engine in the order the engine issued them. A stage other than the
first receives its input tensors from the previous stage; a stage other than the last sends its output
to the next; the last stage returns the sampled tokens to the engine. Every failure is reported to the
engine with the stage's rank before the process exits: the engine must never wait on a dead stage.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from pipeserve.config import EngineConfig
from pipeserve.distributed.comm import StageLink
from pipeserve.distributed.parallel_state import RankLayout, TPGroup, init_tp_groups
from pipeserve.distributed.stage import StageInfo
from pipeserve.timeline import StepRecord
from pipeserve.types import SchedulerOutput
from pipeserve.worker.model_runner import ModelRunner

MAX_RECORDS = 200_000  # step records kept for traces: bounded, so a long-running server does not grow


@dataclass(frozen=True)
class WorkerSpec:
    """What a stage process needs to start (picklable)."""

    config: EngineConfig
    stage: StageInfo
    rank: int
    world_size: int
    init_method: str


class StageWorker:
    """Runs one stage's steps (as one TP rank of it)."""

    def __init__(self, spec: WorkerSpec, tp: TPGroup):
        cfg, stage = spec.config, spec.stage
        self.spec, self.stage, self.tp = spec, stage, tp
        self.runner = ModelRunner(
            cfg.model, stage, num_blocks_per_ve=cfg.num_blocks_per_ve, block_size=cfg.cache.block_size,
            num_virtual_engines=cfg.num_virtual_engines, max_model_len=cfg.scheduler.max_model_len,
            seed=cfg.seed, device=cfg.parallel.device, disable_progress=spec.rank != 0, tp=tp,
        )
        step = tp.size  # pipeline peers are one TP group apart
        self.link = StageLink(None if stage.is_first else spec.rank - step,
                              None if stage.is_last else spec.rank + step, tp)
        self.records: deque[StepRecord] = deque(maxlen=MAX_RECORDS)
        self.busy_s = 0.0  # cumulative compute seconds (records are bounded; this is not)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.runner.model.parameters())  # shared (tied) tensors count once

    def run_step(self, sched: SchedulerOutput) -> Any:
        cfg = self.spec.config.model
        inter = None
        if not self.stage.is_first:
            inter = self.link.recv(sched.num_tokens, cfg.hidden_size, cfg.dtype, self.spec.config.parallel.device)
        out = self.runner.execute(sched, inter)
        record = self.runner.last_record
        self.records.append(record)
        self.busy_s += record.end - record.start
        if not self.stage.is_last:
            self.link.send(out)
            return None
        return out if self.runner.samples else None

    def stats(self) -> dict[str, Any]:
        return {"rank": self.spec.rank, "stage": self.stage.rank, "tp_rank": self.tp.rank,
                "records": list(self.records), "bytes_sent": self.link.bytes_sent,
                "num_params": self.num_params()}


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point of stage `spec.rank`."""
    try:
        torch.set_num_threads(spec.config.parallel.threads_per_worker or 1)
        backend = "nccl" if spec.config.parallel.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(spec.rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=spec.init_method, rank=spec.rank, world_size=spec.world_size,
                                timeout=_timeout(spec.config.parallel.distributed_timeout_s))
        layout = RankLayout(spec.stage.size, spec.world_size // spec.stage.size)
        worker = StageWorker(spec, init_tp_groups(layout, spec.rank))
        conn.send(("ready", spec.rank, worker.num_params()))
        _serve(worker, conn)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the engine went away: nothing left to report to
    except BaseException as exc:  # report, never die silently
        _report(conn, spec.rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


BUSY_REPORT_EVERY_S = 1.0  # how often a stage tells the engine its cumulative compute time (for /metrics)


def _serve(worker: StageWorker, conn: Connection) -> None:
    last_report = 0.0
    while True:
        kind, payload = conn.recv()
        if kind == "step":
            out = worker.run_step(payload)
            if out is not None:
                conn.send(("result", out))
            if worker.records[-1].end - last_report >= BUSY_REPORT_EVERY_S:
                last_report = worker.records[-1].end
                conn.send(("busy", worker.spec.rank, worker.busy_s))
        elif kind == "stats":
            worker.link.wait_sends()
            conn.send(("stats", worker.stats()))
        elif kind == "stop":
            worker.link.wait_sends()
            return
        else:
            raise ValueError(f"unknown message {kind!r}")


def _report(conn: Connection, rank: int, exc: BaseException) -> None:
    cause = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    with contextlib.suppress(OSError, EOFError):  # the engine may already be gone
        conn.send(("error", rank, f"{cause}\n{traceback.format_exc()}"))


def _timeout(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)
