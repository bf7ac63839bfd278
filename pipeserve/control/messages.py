"""Every message between the engine, the node agents (`pipeserve worker`) and the rank processes.

One small frozen dataclass per message kind; receivers dispatch on the type. They travel pickled over
authenticated `multiprocessing` connections (trusted processes only).

Each rank message carries the *generation* of the process group it belongs to. A generation is one
formation of the torch.distributed group: the engine starts generation 0, and every recovery from a failed
rank forms the next one (fresh rendezvous under a per-generation store prefix). A step, result or report of
an older generation is stale and is dropped by whoever receives it, so nothing of a broken group is ever
mistaken for the new one.

Step plans are incremental (a RunStep carries what changed since a request's last step), so a rank keeps
per-request state between steps (`worker/request_states.py`). That state belongs to one generation: a rank
starts each generation without any, and the engine (which recomputes every request after a recovery) sends
each request's whole entry again.

A group forms in two phases, so that no rank ever waits in a rendezvous for a peer that may still fail to
load: every new rank loads its stage (StartStage → Loaded) and every surviving rank drops its old group
(Release → Released); only then are all told to Join the new generation (Join → Ready).

When the KV pool is sized from device memory (CUDA without an explicit budget), the first generation has no KV
pool yet: once every rank is Ready, each profiles its memory (ProfileMemory → MemoryProfiled), the engine
decides the block count, and each allocates its pool and captures its graphs (AllocateKV → KVAllocated). A
replacement rank gets the count in its StartStage's spec and allocates while it loads.

    engine → rank:   StartStage, Release, Join, ProfileMemory, AllocateKV, RunStep, Ping, StatsRequest, WatchSteps,
                     Stop
    rank → engine:   RankHello, Loaded, Released, Ready, MemoryProfiled, KVAllocated, StepResult, GroupLost,
                     StageError, Pong, BusyReport, StatsReply, StepRecords

The live step feed (the dashboard) is off unless someone watches: WatchSteps(on=True) makes a rank send its step
records in StepRecords batches a few times a second, WatchSteps(on=False) stops it. A Pong carries the rank's
wall clock, so the engine can place records of stages on other machines on its own clock.
    engine → agent:  StartRanks, KillRanks, Stop
    agent → engine:  NodeHello
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeserve.timeline import StepRecord
from pipeserve.types import MemoryProfile, SchedulerOutput, StepOutput

# ---- introductions (the first message on a new connection) ------------------------------------------


@dataclass(frozen=True)
class RankHello:
    """A rank process has connected and waits for its StartStage."""

    rank: int
    pid: int
    host: str
    generation: int = -1  # a fresh process belongs to no group yet


@dataclass(frozen=True)
class NodeHello:
    """A node agent (`pipeserve worker --node-rank K`) has connected and will start ranks when asked."""

    node_rank: int
    pid: int
    host: str


# ---- engine → node agent ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRanks:
    """Start these ranks on the agent's machine; they connect back to the engine themselves."""

    ranks: tuple[int, ...]
    generation: int


@dataclass(frozen=True)
class KillRanks:
    """Kill these ranks (SIGKILL) if the agent still runs them: they are stuck or being replaced."""

    ranks: tuple[int, ...]
    generation: int


# ---- engine → rank ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartStage:
    """What a new rank process loads (`spec` is a worker.worker.WorkerSpec); it answers Loaded."""

    spec: Any
    generation: int


@dataclass(frozen=True)
class RunStep:
    """One step plan; every rank receives every step, in the engine's issue order."""

    sched: SchedulerOutput
    generation: int


@dataclass(frozen=True)
class Release:
    """A surviving rank drops its group (keeping its weights and KV pool) and answers Released."""

    generation: int


@dataclass(frozen=True)
class Join:
    """Join `generation`'s group (a fresh rendezvous under its own store prefix); answer Ready."""

    generation: int


@dataclass(frozen=True)
class ProfileMemory:
    """Run the profiling step (worker/memory_profile.py) and answer MemoryProfiled; every rank of the group
    takes part (TP ranks run its collectives together, and ranks sharing a device measure it together)."""

    generation: int


@dataclass(frozen=True)
class AllocateKV:
    """Allocate `num_blocks_per_ve` KV blocks per virtual engine, capture the CUDA graphs; answer KVAllocated."""

    num_blocks_per_ve: int
    generation: int


@dataclass(frozen=True)
class Ping:
    """Answered by the rank's control thread even while its main thread computes or waits on a peer."""

    nonce: int
    generation: int


@dataclass(frozen=True)
class StatsRequest:
    """Ask for step records, bytes sent and the parameter count (no step may be in flight)."""

    generation: int


@dataclass(frozen=True)
class WatchSteps:
    """Start (`on`) or stop sending StepRecords; a rank starts with the feed off. Not tied to a generation: a
    survivor keeps its setting through a recovery, and a replacement is told again when it joins."""

    on: bool
    generation: int = 0


@dataclass(frozen=True)
class Stop:
    """Finish pending sends and exit (to ranks); exit and stop reconnecting (to node agents)."""

    generation: int = 0


# ---- rank → engine ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """A new rank holds its stage's weights and waits for Join."""

    rank: int
    generation: int
    num_params: int
    weights: str = ""  # what the stage holds (precision of its matmuls, memory), for the engine's log


@dataclass(frozen=True)
class Ready:
    """The rank holds its stage's weights and belongs to `generation`'s group."""

    rank: int
    generation: int
    num_params: int


@dataclass(frozen=True)
class MemoryProfiled:
    rank: int
    generation: int
    profile: MemoryProfile


@dataclass(frozen=True)
class KVAllocated:
    """The rank holds its KV pool (and its graphs): it can run steps."""

    rank: int
    generation: int


@dataclass(frozen=True)
class StepResult:
    """The last stage's sampled tokens for one step."""

    output: StepOutput
    generation: int


@dataclass(frozen=True)
class Released:
    """The rank has dropped its old group (its main thread is free again) and waits for Join."""

    rank: int
    generation: int


@dataclass(frozen=True)
class GroupLost:
    """A collective or point-to-point operation failed: a peer is gone. The rank stays, has dropped its
    group, and waits for Release and Join."""

    rank: int
    generation: int
    cause: str


@dataclass(frozen=True)
class StageError:
    """The rank raised; it exits right after sending this. `cause` is one line, `details` the traceback."""

    rank: int
    generation: int
    cause: str
    details: str = ""


@dataclass(frozen=True)
class Pong:
    rank: int
    nonce: int
    generation: int
    wall: float = 0.0  # the rank's time.time() when it answered (clock offset of a stage on another machine)


@dataclass(frozen=True)
class BusyReport:
    """Cumulative compute seconds of the rank (about once a second, for /metrics)."""

    rank: int
    seconds: float
    generation: int


@dataclass(frozen=True)
class StatsReply:
    rank: int
    stats: dict[str, Any] = field(default_factory=dict)
    generation: int = 0


@dataclass(frozen=True)
class StepRecords:
    """Step records of the rank since its last batch (its own wall clock), sent while WatchSteps is on."""

    rank: int
    records: tuple[StepRecord, ...]
    generation: int = 0
