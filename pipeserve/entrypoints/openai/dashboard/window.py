"""Request latencies of the last minute (TTFT, TPOT) and output tokens, for the dashboard.

The server observes every request whether or not a page is open (an append per first token and per finished
request, a sum per output token): a page opened now shows the minute before it.
"""

from __future__ import annotations

import math
import time
from collections import deque

HORIZON_S = 60.0
MAX_SAMPLES = 100_000  # a bound whatever the request rate (a minute at 1,600 requests/s)


class LatencyWindow:
    """(time, seconds) samples of the last `horizon_s`; percentiles on demand."""

    def __init__(self, horizon_s: float = HORIZON_S):
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)

    def add(self, value: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, value))

    def percentiles(self, qs: tuple[float, ...] = (50, 99), now: float | None = None) -> list[float | None]:
        """Nearest-rank percentiles of the samples within the horizon (None when there are none)."""
        now = time.monotonic() if now is None else now
        while self._samples and self._samples[0][0] < now - self.horizon_s:
            self._samples.popleft()
        values = sorted(v for _, v in self._samples)
        if not values:
            return [None for _ in qs]
        return [values[max(0, math.ceil(q / 100 * len(values)) - 1)] for q in qs]

    def __len__(self) -> int:
        return len(self._samples)


class LiveRequestStats:
    """What the dashboard shows of requests: TTFT and TPOT over the last minute, output tokens so far."""

    def __init__(self) -> None:
        self.ttft = LatencyWindow()
        self.tpot = LatencyWindow()
        self.output_tokens = 0

    def first_token(self, seconds: float) -> None:
        self.ttft.add(seconds)

    def tokens(self, n: int) -> None:
        self.output_tokens += n

    def finished(self, decode_seconds: float, num_tokens: int) -> None:
        """Time per output token after the first, for a request that produced at least two."""
        if num_tokens > 1:
            self.tpot.add(decode_seconds / (num_tokens - 1))


class Rate:
    """A counter's rate over the last few seconds, from samples taken whenever it is read."""

    def __init__(self, span_s: float = 3.0):
        self.span_s = span_s
        self._samples: deque[tuple[float, float]] = deque()

    def update(self, total: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self._samples and self._samples[-1][0] < now - self.span_s:
            self._samples.clear()  # not read for a while (no page open): start afresh
        self._samples.append((now, total))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.span_s:
            self._samples.popleft()
        t0, v0 = self._samples[0]
        return (total - v0) / (now - t0) if now > t0 else 0.0
