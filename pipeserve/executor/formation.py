"""Forming a generation of the process group: at start-up (every rank new) and after a failure.

After a failure: find who is gone (closed connection, StageError) and who is stuck (no Pong within
seconds: SIGSTOPped, or a lost machine), kill both, tell every survivor to Release its group (a survivor
that cannot free itself within seconds is replaced too, never waited on for the collective timeout),
start replacements through the launcher, and once every new rank has Loaded its stage, tell all ranks
to Join the new generation. Only replaced ranks load weights.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

from pipeserve.control.messages import Join, Ping, Release, StartStage
from pipeserve.executor.rank_launcher import NodeAgentMissing, RankLauncher
from pipeserve.executor.rank_table import RankTable

logger = logging.getLogger(__name__)

PING_TIMEOUT_S = 3.0  # a rank's control thread answers at once, whatever its main thread does
RELEASE_TIMEOUT_S = 10.0  # a survivor's main thread gets this long to come free of its old group


class StageFailure(RuntimeError):
    """A pipeline stage raised or died and could not be recovered; the message names the stage and the cause."""


class FormationInterrupted(RuntimeError):
    """A rank died while the group was forming: worth another attempt, if the restart budget allows."""


class GroupFormation:
    """Brings every rank into one generation of the group."""

    def __init__(self, table: RankTable, launcher: RankLauncher, specs: list, who: Callable[[int], str],
                 join_timeout_s: float):
        self.table, self.launcher, self.specs, self.who = table, launcher, specs, who
        self.join_timeout_s = join_timeout_s
        self._nonces = itertools.count(1)
        self.started: set[int] = set()  # ranks started since the caller last cleared it (their KV is new)

    def start_all(self, generation: int) -> list[int]:
        """Start-up: every rank is new. Returns each rank's parameter count."""
        return self._start_and_join(generation, list(range(len(self.specs))))

    def reform(self, generation: int) -> None:
        """After a failure: replace what is gone or stuck, keep the rest (the replaced ranks join `started`)."""
        t = self.table
        with t.cv:
            gone = {r for r in range(t.world_size) if r in t.dead or r not in t.conns}
        stuck = self._unresponsive([r for r in range(t.world_size) if r not in gone])
        for r in sorted(stuck):
            logger.error("%s (%s) does not answer: treating it as stuck", self.who(r), self.launcher.where(r))
        replace = sorted(gone | stuck)
        self._retire(replace, generation)
        survivors = [r for r in range(t.world_size) if r not in replace]
        not_freed = self._release(survivors, generation)
        if not_freed:
            logger.error("ranks %s could not leave the broken group within %.0f s: replacing them too",
                         not_freed, RELEASE_TIMEOUT_S)
            self._retire(not_freed, generation)
            replace = sorted(set(replace) | set(not_freed))
        for r in replace:
            logger.warning("starting a replacement for %s on %s", self.who(r), self.launcher.where(r))
        self._start_and_join(generation, replace)

    # ---- steps of a formation ------------------------------------------------------------------------

    def _unresponsive(self, ranks: list[int]) -> set[int]:
        t = self.table
        nonce = next(self._nonces)
        for r in ranks:
            self.table.send(r, Ping(nonce, -1))
        with t.cv:
            t.wait_for(lambda: all(t.pongs.get(r) == nonce or r in t.dead for r in ranks),
                       time.monotonic() + PING_TIMEOUT_S)
            return {r for r in ranks if t.pongs.get(r) != nonce}

    def _retire(self, ranks: list[int], generation: int) -> None:
        """Kill these ranks' processes (if any still run) and forget their connections."""
        self.launcher.kill(ranks, generation)
        with self.table.cv:
            for r in ranks:
                conn = self.table.conns.pop(r, None)
                if conn is not None:
                    conn.close()

    def _release(self, survivors: list[int], generation: int) -> list[int]:
        t = self.table
        with t.cv:
            t.released.clear()
        for r in survivors:
            self.table.send(r, Release(generation))
        with t.cv:
            t.wait_for(lambda: all(r in t.released or r in t.dead for r in survivors),
                       time.monotonic() + RELEASE_TIMEOUT_S)
            lost = [r for r in survivors if r in t.dead]
            if lost:
                raise FormationInterrupted(f"{self.who(lost[0])} died while the group re-formed: {t.dead[lost[0]]}")
            return [r for r in survivors if r not in t.released]

    def _start_and_join(self, generation: int, new: list[int]) -> list[int]:
        t = self.table
        deadline = time.monotonic() + self.join_timeout_s
        with t.cv:
            for r in new:
                t.hellos.pop(r, None)
                t.dead.pop(r, None)
                t.start_errors.pop(r, None)
                t.loaded.pop(r, None)
            t.ready.clear()
        self.started.update(new)
        try:
            self.launcher.start(new, generation, deadline)
        except NodeAgentMissing as exc:
            raise StageFailure(str(exc)) from None
        except RuntimeError as exc:
            raise StageFailure(f"cannot start {self.who(new[0])}: {exc}") from None
        self._hand_out_specs(generation, new, deadline)
        with t.cv:
            t.wait_for(lambda: all(r in t.loaded for r in new), deadline, lambda: self._check_starting(new))
            missing = [r for r in new if r not in t.loaded]
        if missing:
            raise StageFailure(f"ranks {missing} did not load their stage within {self.join_timeout_s:.0f} s")
        everyone = range(t.world_size)
        for r in everyone:
            self.table.send(r, Join(generation))
        with t.cv:
            t.wait_for(lambda: len(t.ready) == t.world_size, deadline, lambda: self._check_starting(everyone))
            missing = [r for r in range(t.world_size) if r not in t.ready]
            if missing:
                raise FormationInterrupted(f"ranks {missing} did not join generation {generation} within "
                                           f"{self.join_timeout_s:.0f} s")
            return [t.ready[r] for r in range(t.world_size)]

    def _hand_out_specs(self, generation: int, new: list[int], deadline: float) -> None:
        """Wait for each new rank to connect and give it its StartStage."""
        t = self.table
        waiting = set(new)
        while waiting:
            with t.cv:
                t.wait_for(lambda: any(r in t.hellos for r in waiting), deadline, lambda: self._check_exits(waiting))
                arrived = [r for r in waiting if r in t.hellos]
                if not arrived:
                    raise StageFailure(self.launcher.not_joined(sorted(waiting), self.join_timeout_s))
                for r in arrived:
                    t.conns[r] = t.hellos.pop(r)
            for r in arrived:
                waiting.discard(r)
                self.table.send(r, StartStage(self.specs[r], generation))

    def _check_exits(self, ranks) -> None:
        for r in ranks:
            code = self.launcher.exit_code(r)
            if code is not None:
                raise FormationInterrupted(f"{self.who(r)} exited with code {code} before connecting")

    def _check_starting(self, ranks) -> None:
        """While forming: a StageError is a start failure (final); a death is worth another attempt."""
        t = self.table
        for r in ranks:
            if r in t.start_errors:
                raise StageFailure(f"{self.who(r)} failed to start: {t.start_errors[r]}")
            if r in t.dead:
                raise FormationInterrupted(f"{self.who(r)} died while starting: {t.dead[r]}")
