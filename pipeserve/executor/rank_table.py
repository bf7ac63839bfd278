"""What the engine knows about its rank processes right now, shared by the threads that learn it.

The acceptor thread adds new connections, the monitor thread records what ranks say (and which connections
closed), and a group formation waits on these facts. One condition variable guards them all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection


class RankTable:
    """Per rank: its live connection, and the acknowledgements of the generation being formed."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.cv = threading.Condition()
        self.send_lock = threading.Lock()  # one sender at a time on every connection, in one global order
        self.conns: dict[int, Connection] = {}  # the rank's current process
        self.hellos: dict[int, Connection] = {}  # connected, not yet given a StartStage
        self.loaded: dict[int, int] = {}  # rank -> parameter count, after StartStage
        self.released: set[int] = set()
        self.ready: dict[int, int] = {}  # rank -> parameter count, joined the generation being formed
        self.pongs: dict[int, int] = {}  # rank -> last nonce answered
        self.dead: dict[int, str] = {}  # rank -> why it is gone (since the last formation finished)
        self.start_errors: dict[int, str] = {}  # rank -> StageError of a process that never became Ready

    def wait_for(self, done: Callable[[], bool], deadline: float, check: Callable[[], None] | None = None) -> bool:
        """Wait (holding `cv`) until `done()` or the deadline; `check()` may raise to stop early."""
        while not done():
            if check is not None:
                check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.cv.wait(min(remaining, 0.2))
        return True

    def mark_dead(self, rank: int, conn: Connection | None, cause: str) -> bool:
        """Record that rank's process is gone (when `conn` is still its current one); True if it was."""
        with self.cv:
            if conn is not None and self.conns.get(rank) is not conn:
                return False  # an older process of the rank, already replaced
            self.conns.pop(rank, None)
            self.dead.setdefault(rank, cause)
            self.cv.notify_all()
            return True

    def send(self, rank: int, msg: object) -> None:
        """Send to a rank's current process; a closed connection marks it dead (the monitor says why)."""
        with self.cv:
            conn = self.conns.get(rank)
        if conn is None:
            return
        try:
            with self.send_lock:
                conn.send(msg)
        except (OSError, ValueError):
            self.mark_dead(rank, conn, "its connection closed")
