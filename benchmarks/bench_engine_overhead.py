"""The engine's own CPU per decode step, with an executor that costs nothing.

N requests (128-token prompts, ignore_eos) decode together in one virtual engine while an executor returns
each step's tokens instantly: every microsecond measured is the engine's (planning the step, applying the
tokens, stop checks, detokenizing with the embedded model's real tokenizer, building outputs, waking the
streams and the streams' consumers), all on the one event loop that also serves HTTP. Listeners that want
only the final output (offline `LLM.generate`) and listeners that read every step (streaming clients), each
without and with the wire costs of a 2-stage pipeline (the plan pickled as the multi-process executor sends
it, the result pickled and unpickled: see ZeroCostExecutor).
Reported: engine CPU ms per decode step (process time between consecutive decode steps, steady state) at
32 and 256 running requests: only steps in which every request decodes count (after the last prompt is
prefilled, before the first request finishes), so building the final outputs (detokenizing each request's
whole text once) is not spread over them.

    python benchmarks/bench_engine_overhead.py --markdown results/engine_overhead.md

To measure another commit's engine with the same benchmark, put that commit's package first on the path
(`git worktree add /tmp/other REV; PYTHONPATH=/tmp/other python benchmarks/bench_engine_overhead.py`);
step plans with one entry per decode and engines without `final_only` streams are handled too.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import pickle
import sys
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any

from pipeserve.control.messages import RunStep
from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.executor.base import Executor
from pipeserve.loader.tokenizer import load_tokenizer
from pipeserve.sampling_params import SamplingParams
from pipeserve.types import SampledToken, SchedulerOutput, StepOutput

TEXT_TOKENS = list(range(1000, 1600))  # ordinary word pieces of the embedded vocabulary, cycled
PROMPT_LEN = 128


def _samples(r) -> bool:
    return r.samples if hasattr(r, "samples") else r.sampling_params is not None  # older plans: params = samples


def _token(context_len: int) -> int:
    return TEXT_TOKENS[context_len % len(TEXT_TOKENS)]


def _sampled(sched: SchedulerOutput) -> dict:
    """The step's tokens, in the form the stages send back. Built at C speed where the form allows (every
    decode of a step gets the same token; steps differ), so that what is measured is the engine's work, not
    this stand-in's: the stages build the real ones, and the engine only unpickles them (`wire`)."""
    if not hasattr(sched, "decodes"):  # plans without DecodeBatch: one SampledToken per request, decodes as entries
        return {r.req_id: SampledToken(_token(r.context_len)) for r in sched.requests if _samples(r)}
    sampled = dict.fromkeys(sched.decodes.req_ids, _token(sched.step_id))
    sampled.update((r.req_id, _token(r.context_len)) for r in sched.requests if r.samples)
    return sampled


def _num_decodes(sched: SchedulerOutput) -> int:
    return len(getattr(sched, "decodes", ())) + sum(r.is_decode for r in sched.requests)


class ZeroCostExecutor(Executor):
    """Returns a token for every sampling request at once; notes the process time of every decode step.

    With `wire`, it also pays what the multi-process executor pays for a 2-stage pipeline (the plan pickled
    once for every rank; plans without DecodeBatch once per rank, as the executor that sent them did), plus pickling and
    unpickling the result (the unpickling happens in the engine's monitor thread; the pickling is the last
    stage's, counted here as well)."""

    def __init__(self, wire: bool, num_requests: int):
        self.wire, self.num_requests = wire, num_requests
        self.decode_cpu: list[float] = []

    async def execute(self, sched: SchedulerOutput, generation: int | None = None) -> StepOutput:
        if sched.kind == "decode" and _num_decodes(sched) == self.num_requests:  # every request decoding
            self.decode_cpu.append(time.process_time())
        out = StepOutput(sched.step_id, sched.virtual_engine, _sampled(sched))
        if self.wire:
            if hasattr(sched, "decodes"):
                ForkingPickler.dumps(RunStep(sched, 0))
            else:
                for _ in range(2):
                    pickle.dumps(RunStep(sched, 0), protocol=pickle.HIGHEST_PROTOCOL)
            out = pickle.loads(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
        return out

    def collect_stats(self) -> list[dict[str, Any]]:
        return []

    def shutdown(self) -> None:
        pass


async def measure(num_requests: int, steps: int, wire: bool, tokenizer: Any, final_only: bool) -> float:
    budget = max(512, num_requests)
    # The prompts take this many steps to prefill (the first requests decode meanwhile); with that many more
    # tokens each, every request is still running for `steps` decode steps after the last prefill.
    prefill_steps = -(-num_requests * PROMPT_LEN // budget)
    max_tokens = steps + prefill_steps + 1
    config = EngineArgs(max_num_seqs=num_requests, max_num_batched_tokens=budget,
                        num_kv_blocks=num_requests * (PROMPT_LEN + max_tokens) // 16 + num_requests,
                        max_model_len=2048, num_virtual_engines=1).create_engine_config()
    executor = ZeroCostExecutor(wire, num_requests)
    engine = AsyncEngine(config, executor, tokenizer)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    async with engine.running():
        # the pipeserve on the path may predate `final_only` streams
        extra = {"final_only": final_only} if "final_only" in inspect.signature(engine.add_request).parameters else {}
        streams = [engine.add_request([TEXT_TOKENS[(i + j) % 600] for j in range(PROMPT_LEN)], params, **extra)
                   for i in range(num_requests)]

        async def consume(stream) -> int:
            n = 0
            async for out in stream:
                n = len(out.outputs[0].token_ids)
            return n

        counts = await asyncio.gather(*(consume(s) for s in streams))
    assert counts == [max_tokens] * num_requests
    marks = executor.decode_cpu[len(executor.decode_cpu) // 4:]  # steady state: past the first quarter
    assert len(marks) >= steps // 2, len(marks)
    return (marks[-1] - marks[0]) / (len(marks) - 1) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", default="32,256")
    p.add_argument("--steps", type=int, default=200, help="decode steps with every request running")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the least is reported (this VM's "
                                                             "CPU time per step varies up to 2x from run to run)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write_report

    tokenizer = load_tokenizer(EngineArgs().create_engine_config().model.path)
    rows, data = [], {}
    for n in map(int, args.requests.split(",")):
        def best(wire: bool, final_only: bool, n: int = n) -> float:
            return min(asyncio.run(measure(n, args.steps, wire, tokenizer, final_only))
                       for _ in range(args.repeats))

        final, wired, streamed, pickled = best(False, True), best(True, True), best(False, False), best(True, False)
        data[n] = {"final_only_ms": final, "final_only_with_wire_ms": wired, "streamed_ms": streamed,
                   "streamed_with_wire_ms": pickled}
        rows.append(f"| {n} | {final:.2f} | {wired:.2f} | {streamed:.2f} | {pickled:.2f} |")
    text = "\n".join(["Engine CPU ms per decode step, zero-cost executor, one virtual engine, "
                      f"{args.steps} steps, mean "
                      f"over the steady state (past the first quarter), least of {args.repeats} runs", "",
                      "| running requests | final output only (offline `LLM`) | the same, with the wire costs of 2 "
                      "stages | every step streamed to a listener | streamed, with the wire costs |",
                      "|---:|---:|---:|---:|---:|", *rows])
    write_report(text, args.markdown, args.output_json, data)


if __name__ == "__main__":
    main()
