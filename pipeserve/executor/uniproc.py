"""All stages in the engine's own process: the PP=1 path."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from pipeserve.config import EngineConfig
from pipeserve.distributed.stage import StageInfo
from pipeserve.executor.base import Executor
from pipeserve.executor.step_feed import LocalStepFeed
from pipeserve.types import MemoryProfile, SchedulerOutput, StepOutput
from pipeserve.worker.sampled_ids import PendingStep
from pipeserve.worker.worker import StageWorker


class UniProcExecutor(Executor):
    """Runs the whole model in this process. `offload=True` runs steps in a thread so an event loop
    serving HTTP stays responsive (one thread: steps run one at a time, in the order they were issued);
    offline generation runs them inline.

    With async scheduling the stage keeps the ids it samples on the device (`holds_sampled_ids`): a step is
    issued (its kernels queued, its ids copied to the host without waiting) and its tokens awaited in a waiter
    thread, so the engine plans and issues the next step while the device still runs this one."""

    def __init__(self, config: EngineConfig, offload: bool = False):
        if config.parallel.threads_per_worker:
            torch.set_num_threads(config.parallel.threads_per_worker)
        self.offload = offload
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pipeserve-step") if offload else None
        self.worker = StageWorker(config, StageInfo.whole_model(config.model.num_hidden_layers))
        self.holds_sampled_ids = self.worker.holds_sampled_ids
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="pipeserve-tokens") if self.holds_sampled_ids \
            else None
        self.step_feed = LocalStepFeed(lambda: self.worker)

    async def execute(self, sched: SchedulerOutput, generation: int | None = None) -> StepOutput:
        if self.holds_sampled_ids:
            return await self._issue(sched)
        if self.offload:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self.worker.run_step, sched)
        return self.worker.run_step(sched)

    async def _issue(self, sched: SchedulerOutput) -> StepOutput:
        if self.offload:
            issued = self._thread.submit(partial(self.worker.run_step, sched, defer=True))
            try:
                out = await asyncio.wrap_future(issued)
            except asyncio.CancelledError:
                issued.add_done_callback(self._take_dropped)
                raise
        else:
            out = self.worker.run_step(sched, defer=True)
        if not isinstance(out, PendingStep):
            return out
        if out.ready():
            return out.result()
        # Shielded: a step dropped while its tokens are on their way still completes, so the stage's busy clock
        # (worker.py) sees it end.
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._waiter, out.result))

    def _take_dropped(self, issued: Future) -> None:
        """A step issued on the step thread whose caller was cancelled meanwhile: complete it all the same."""
        if issued.cancelled() or issued.exception() is not None or not isinstance(issued.result(), PendingStep):
            return  # it never ran, failed, or needs nothing more
        with contextlib.suppress(RuntimeError):  # the executor shut down: nothing reads the clock any more
            self._waiter.submit(issued.result().result)

    def profile_memory(self) -> list[MemoryProfile]:
        return [self.worker.profile_memory()]

    def allocate_kv(self, num_blocks_per_ve: int) -> None:
        self.worker.allocate_kv(num_blocks_per_ve)

    def busy_seconds(self) -> list[float]:
        return [self.worker.busy_s]

    def collect_stats(self) -> list[dict[str, Any]]:
        return [self.worker.stats()]

    def shutdown(self) -> None:
        for thread in (self._thread, self._waiter):
            if thread is not None:
                thread.shutdown(wait=False, cancel_futures=True)
        on_cuda = self.worker is not None and torch.device(self.worker.config.parallel.device).type == "cuda"
        self.worker = None
        if on_cuda:  # hand the KV pool and the graphs' memory back to the device (torch would keep it cached)
            gc.collect()
            torch.cuda.empty_cache()
