"""All stages in the engine's own process: the PP=1 path."""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pipeserve.config import EngineConfig
from pipeserve.distributed.stage import StageInfo
from pipeserve.executor.base import Executor
from pipeserve.executor.step_feed import LocalStepFeed
from pipeserve.types import MemoryProfile, SchedulerOutput, StepOutput
from pipeserve.worker.worker import StageWorker


class UniProcExecutor(Executor):
    """Runs the whole model in this process. `offload=True` runs steps in a thread so an event loop
    serving HTTP stays responsive (one thread: steps run one at a time, in the order they were issued);
    offline generation runs them inline."""

    def __init__(self, config: EngineConfig, offload: bool = False):
        if config.parallel.threads_per_worker:
            torch.set_num_threads(config.parallel.threads_per_worker)
        self.offload = offload
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pipeserve-step") if offload else None
        self.worker = StageWorker(config, StageInfo.whole_model(config.model.num_hidden_layers))
        self.step_feed = LocalStepFeed(lambda: self.worker)

    async def execute(self, sched: SchedulerOutput, generation: int | None = None) -> StepOutput:
        if self.offload:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self.worker.run_step, sched)
        return self.worker.run_step(sched)

    def profile_memory(self) -> list[MemoryProfile]:
        return [self.worker.profile_memory()]

    def allocate_kv(self, num_blocks_per_ve: int) -> None:
        self.worker.allocate_kv(num_blocks_per_ve)

    def busy_seconds(self) -> list[float]:
        return [self.worker.busy_s]

    def collect_stats(self) -> list[dict[str, Any]]:
        return [self.worker.stats()]

    def shutdown(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
        on_cuda = self.worker is not None and torch.device(self.worker.config.parallel.device).type == "cuda"
        self.worker = None
        if on_cuda:  # hand the KV pool and the graphs' memory back to the device (torch would keep it cached)
            gc.collect()
            torch.cuda.empty_cache()
