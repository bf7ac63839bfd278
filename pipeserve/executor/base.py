"""An executor runs steps on the model's stages, wherever they live."""

from __future__ import annotations

import abc
from typing import Any

from pipeserve.executor.recovery_log import RecoveryLog
from pipeserve.executor.step_feed import StepFeed
from pipeserve.types import MemoryProfile, SchedulerOutput, StepOutput


class StepInterrupted(RuntimeError):
    """A step was lost to a stage failure that is being recovered: its requests are recomputed.

    `lost` is False when the step never ran (it was planned for a generation that had already failed)."""

    def __init__(self, cause: str, lost: bool = True):
        super().__init__(cause)
        self.lost = lost


class Executor(abc.ABC):
    """Takes a virtual engine's step plan to the stages and returns the last stage's StepOutput."""

    failure: BaseException | None = None  # set once a stage has failed for good
    generation: int = 0  # bumps with every recovery; steps planned for an older one never run
    recoveries: RecoveryLog | None = None  # restarts and recovery spans, where the executor can recover
    # Async scheduling: the stages feed the ids a step samples to the next step on the device, so the engine
    # may plan a decode before its input token is known (types.PLACEHOLDER). Where False, decodes wait.
    holds_sampled_ids: bool = False
    step_feed: StepFeed | None = None  # the live step records, kept while someone watches (the dashboard)

    @abc.abstractmethod
    async def execute(self, sched: SchedulerOutput, generation: int | None = None) -> StepOutput:
        """Run one step; steps are executed in the order this is called. A step planned for an older
        `generation` than the current one raises StepInterrupted(lost=False) without running."""

    def profile_memory(self) -> list[MemoryProfile]:
        """Every rank's memory profile, for an engine whose CUDA stages started without a KV pool
        (engine/kv_sizing.py); then allocate_kv."""
        raise NotImplementedError(f"{type(self).__name__} cannot size KV pools from device memory: "
                                  f"set num_kv_blocks")

    def allocate_kv(self, num_blocks_per_ve: int) -> None:
        """Have every rank allocate this many KV blocks per virtual engine; steps can run once it returns."""
        raise NotImplementedError(f"{type(self).__name__} cannot size KV pools from device memory: "
                                  f"set num_kv_blocks")

    async def wait_ready(self) -> int:
        """Wait until steps can run again (after a recovery); the generation then current."""
        if self.failure is not None:
            raise self.failure
        return self.generation

    def kv_lost_through(self, generation: int) -> int | None:
        """The last pipeline stage replaced (its KV cache lost) by recoveries since `generation`, or None
        when no stage lost its KV (a false alarm: nothing to recompute)."""
        spans = self.recoveries.spans if self.recoveries is not None else []
        return max((s for span in spans if span.generation > generation for s in span.replaced_stages),
                   default=None)

    @property
    def recovering(self) -> bool:
        """True while a failed stage is being replaced."""
        return False

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop every process and free every resource; safe to call twice."""

    def check_health(self) -> None:
        """Raise if the stages have failed for good (a recovery in progress is not a failure)."""
        if self.failure is not None:
            raise self.failure

    def busy_seconds(self) -> list[float] | None:
        """Cumulative compute seconds per stage, if this executor can tell without asking the stages."""
        return None

    def where(self, stage: int) -> str:
        """The machine of a stage's first rank, as a person reads it."""
        return "the engine's process"

    def num_steps_pending(self) -> int:
        """Steps sent to the stages whose results have not come back (per-step bookkeeping)."""
        return 0

    @abc.abstractmethod
    def collect_stats(self) -> list[dict[str, Any]]:
        """Per stage: rank, step records, bytes sent to the next stage, parameter count."""
