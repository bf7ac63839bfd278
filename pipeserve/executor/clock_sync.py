"""Each stage process's clock relative to the engine's, so step records from other machines line up.

A stage answers a Ping with its wall clock (Pong.wall). Assuming the answer was taken halfway through the round
trip, offset = stage_wall - (t_send + t_recv) / 2, and an engine-clock time is stage time - offset. The error is
at most half the round trip, so of several pings the one with the shortest round trip is kept.
"""

from __future__ import annotations

import threading
import time


class ClockSync:
    """Per rank: pings in flight, and the offset of the shortest round trip so far."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict[tuple[int, int], float] = {}  # (rank, nonce) -> engine time sent
        self._best: dict[int, tuple[float, float]] = {}  # rank -> (round trip, offset)

    def forget(self, rank: int) -> None:
        """The rank's process was replaced: its clock is measured again."""
        with self._lock:
            self._best.pop(rank, None)
            for key in [k for k in self._sent if k[0] == rank]:
                del self._sent[key]

    def sent(self, rank: int, nonce: int, at: float | None = None) -> None:
        with self._lock:
            self._sent[(rank, nonce)] = time.time() if at is None else at

    def answered(self, rank: int, nonce: int, stage_wall: float, at: float | None = None) -> float | None:
        """Record a Pong; returns the rank's offset now in use (None for an answer to no ping of ours)."""
        t_recv = time.time() if at is None else at
        with self._lock:
            t_send = self._sent.pop((rank, nonce), None)
            if t_send is None:
                return None
            rtt, offset = t_recv - t_send, stage_wall - (t_send + t_recv) / 2
            best = self._best.get(rank)
            if best is None or rtt < best[0]:
                self._best[rank] = (rtt, offset)
            return self._best[rank][1]

    def offset(self, rank: int) -> float:
        """Seconds the rank's clock is ahead of the engine's (0 until measured)."""
        best = self._best.get(rank)
        return best[1] if best is not None else 0.0

    def offsets(self) -> dict[int, float]:
        with self._lock:
            return {r: b[1] for r, b in self._best.items()}
