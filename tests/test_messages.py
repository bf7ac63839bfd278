"""The typed messages between engine, node agents and ranks survive a trip through a real pipe."""

from __future__ import annotations

import dataclasses
from multiprocessing import Pipe

import pytest

from pipeserve.control import messages as m
from pipeserve.sampling_params import SamplingParams
from pipeserve.timeline import StepRecord
from pipeserve.types import MemoryProfile, SampledToken, ScheduledRequest, SchedulerOutput, StepOutput

SCHED = SchedulerOutput(3, 1, [ScheduledRequest("r", [1, 2], 0, [4], SamplingParams(temperature=0))])
EXAMPLES = [
    m.RankHello(rank=2, pid=99, host="h"), m.NodeHello(node_rank=1, pid=98, host="h"),
    m.StartRanks(ranks=(2, 3), generation=1), m.KillRanks(ranks=(3,), generation=1),
    m.StartStage(spec={"stand-in": "WorkerSpec"}, generation=1), m.RunStep(sched=SCHED, generation=1),
    m.Release(generation=2), m.Join(generation=2), m.Ping(nonce=5, generation=2), m.StatsRequest(generation=2),
    m.Stop(generation=2), m.Loaded(rank=1, generation=2, num_params=10), m.Ready(rank=1, generation=2, num_params=10),
    m.StepResult(output=StepOutput(3, 1, {"r": 7}, {"r": SampledToken(7, -0.5)}), generation=2),
    m.Released(rank=1, generation=2), m.GroupLost(rank=1, generation=2, cause="Connection closed by peer"),
    m.StageError(rank=1, generation=2, cause="IndexError: x", details="Traceback ..."),
    m.Pong(rank=1, nonce=5, generation=2), m.BusyReport(rank=1, seconds=1.5, generation=2),
    m.StatsReply(rank=1, stats={"records": []}, generation=2),
    m.ProfileMemory(generation=0), m.AllocateKV(num_blocks_per_ve=512, generation=0),
    m.MemoryProfiled(rank=1, generation=0, profile=MemoryProfile(device="h:GPU-1", total_bytes=8 << 30,
                                                                 used_bytes=1 << 30, activation_bytes=1 << 28,
                                                                 graph_bytes=1 << 26, kv_bytes_per_block=1 << 16)),
    m.KVAllocated(rank=1, generation=0),
    m.WatchSteps(on=True, generation=2), m.Pong(rank=1, nonce=-3, generation=2, wall=1.7e9),
    m.StepRecords(rank=1, records=(StepRecord(0, 4, 1, 10.0, 10.01, "decode", 3),), generation=2),
]


def _message_kinds() -> set[type]:
    return {obj for obj in vars(m).values() if dataclasses.is_dataclass(obj) and obj.__module__ == m.__name__}


def test_every_message_kind_has_an_example():
    assert _message_kinds() == {type(e) for e in EXAMPLES}


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda e: type(e).__name__)
def test_message_round_trips_over_a_pipe(msg):
    a, b = Pipe()
    a.send(msg)
    got = b.recv()
    assert type(got) is type(msg) and got == msg


def test_every_kind_but_the_hellos_declares_its_generation():
    """A message left over from an earlier generation of the group must be recognisable as such: every kind
    except the hellos (sent before a rank knows its generation) has an int `generation` field."""
    for kind in _message_kinds() - {m.RankHello, m.NodeHello}:
        types = {f.name: f.type for f in dataclasses.fields(kind)}
        assert types.get("generation") in (int, "int"), kind.__name__
