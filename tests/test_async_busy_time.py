"""A stage's busy seconds (`pipeserve_stage_busy_seconds`) with async scheduling, forced on on the CPU: each step
counts from its issue until its tokens are taken (`PendingStep.result`), not only while it is issued, and
the count stops when the run does."""

from __future__ import annotations

import time

from pipeserve import LLM, SamplingParams
from pipeserve.worker.sampled_ids import PendingStep

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21]]
ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=64, seed=0)
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def busy_run(model: str, monkeypatch, **kwargs) -> tuple[float, float, list[bool]]:
    """(stage busy seconds, wall seconds, for each deferred step whether the stage counted it busy while its
    tokens were awaited) of one run."""
    growing = []
    with LLM(model, **ENGINE, **kwargs) as llm:
        executor = llm.engine.executor
        result = PendingStep.result

        def awaited(pending):
            before = executor.busy_seconds()[0]
            time.sleep(0.001)
            growing.append(executor.busy_seconds()[0] > before)
            return result(pending)

        monkeypatch.setattr(PendingStep, "result", awaited)
        start = time.monotonic()
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
        wall = time.monotonic() - start
        monkeypatch.undo()
        busy = executor.busy_seconds()[0]
        time.sleep(0.01)
        assert executor.busy_seconds()[0] == busy  # no step left counting after the run
        return busy, wall, growing


def test_async_steps_are_busy_until_their_tokens_are_taken(tiny_model, monkeypatch):
    busy, wall, growing = busy_run(tiny_model, monkeypatch, async_scheduling=True)
    sync_busy, sync_wall, sync_growing = busy_run(tiny_model, monkeypatch, async_scheduling=False)
    assert growing and all(growing)  # the step was still counted while its tokens were awaited
    assert sync_growing and not any(sync_growing)  # synchronous steps count their compute only
    assert 0 < busy <= wall and 0 < sync_busy <= sync_wall
