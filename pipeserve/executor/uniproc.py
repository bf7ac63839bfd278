"""All stages in the engine's own process: the PP=1 path."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import torch

from pipeserve.config import EngineConfig
from pipeserve.distributed.stage import StageInfo
from pipeserve.executor.base import Executor
from pipeserve.timeline import StepRecord
from pipeserve.types import SchedulerOutput, StepOutput
from pipeserve.worker.model_runner import ModelRunner
from pipeserve.worker.worker import MAX_RECORDS


class UniProcExecutor(Executor):
    """Runs the whole model in this process. `offload=True` runs steps in a thread so an event loop
    serving HTTP stays responsive; offline generation runs them inline."""

    def __init__(self, config: EngineConfig, offload: bool = False):
        if config.parallel.threads_per_worker:
            torch.set_num_threads(config.parallel.threads_per_worker)
        self.offload = offload
        self.records: deque[StepRecord] = deque(maxlen=MAX_RECORDS)
        self._busy_s = 0.0  # a running sum: the records deque is bounded, the counter must not forget
        self.runner = ModelRunner(
            config.model, StageInfo.whole_model(config.model.num_hidden_layers),
            num_blocks_per_ve=config.num_blocks_per_ve, block_size=config.cache.block_size,
            num_virtual_engines=config.num_virtual_engines, max_model_len=config.scheduler.max_model_len,
            seed=config.seed, device=config.parallel.device,
        )

    async def execute(self, sched: SchedulerOutput) -> StepOutput:
        if self.offload:
            out = await asyncio.to_thread(self.runner.execute, sched)
        else:
            out = self.runner.execute(sched)
        record = self.runner.last_record
        self.records.append(record)
        self._busy_s += record.end - record.start
        return out

    def busy_seconds(self) -> list[float]:
        return [self._busy_s]

    def collect_stats(self) -> list[dict[str, Any]]:
        return [{"rank": 0, "records": list(self.records), "bytes_sent": 0,
                 "num_params": sum(p.numel() for p in self.runner.model.parameters())}]

    def shutdown(self) -> None:
        self.runner = None
