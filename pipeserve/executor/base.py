"""An executor runs steps on the model's stages, wherever they live."""

from __future__ import annotations

import abc
from typing import Any

from pipeserve.types import SchedulerOutput, StepOutput


class Executor(abc.ABC):
    """Takes a virtual engine's step plan to the stages and returns the last stage's StepOutput."""

    failure: BaseException | None = None  # set once a stage has failed

    @abc.abstractmethod
    async def execute(self, sched: SchedulerOutput) -> StepOutput:
        """Run one step; steps are executed in the order this is called."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop every process and free every resource; safe to call twice."""

    def check_health(self) -> None:  # noqa: B027 - a process-less executor has nothing to check
        """Raise if any stage is dead."""

    def busy_seconds(self) -> list[float] | None:
        """Cumulative compute seconds per stage, if this executor can tell without asking the stages."""
        return None

    @abc.abstractmethod
    def collect_stats(self) -> list[dict[str, Any]]:
        """Per stage: rank, step records, bytes sent to the next stage, parameter count."""
