"""How often the pipeline has healed itself, how long it took, and whether it may try again."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class RecoverySpan:
    """One recovery, from the failure's detection to the first step of the new generation (wall clock)."""

    start: float
    end: float
    cause: str
    replaced_stages: list[int]  # their KV caches are gone
    generation: int  # the generation the recovery formed


@dataclass
class RecoveryLog:
    """Read by /metrics and the trace: restarts per stage, and every recovery's span."""

    restarts_by_stage: Counter = field(default_factory=Counter)
    spans: list[RecoverySpan] = field(default_factory=list)

    def record(self, span: RecoverySpan) -> None:
        self.spans.append(span)
        self.restarts_by_stage.update(set(span.replaced_stages))

    def durations(self) -> list[float]:
        return [s.end - s.start for s in self.spans]


class RestartBudget:
    """At most `max_restarts` restart attempts within any `window_s` seconds (--max-stage-restarts)."""

    def __init__(self, max_restarts: int, window_s: float):
        self.max_restarts, self.window_s = max_restarts, window_s
        self._attempts: deque[float] = deque()

    def take(self) -> bool:
        """Use one attempt now; False when the budget of the window is spent."""
        now = time.monotonic()
        while self._attempts and now - self._attempts[0] > self.window_s:
            self._attempts.popleft()
        if len(self._attempts) >= self.max_restarts:
            return False
        self._attempts.append(now)
        return True
