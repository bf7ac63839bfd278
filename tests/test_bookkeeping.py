"""Nothing grows with the number of requests served: every per-request structure of the engine, the
executor and the stages returns to empty once the requests end, however they end (finished, stopped,
aborted by a failing caller, preempted and recomputed, choices of n, penalties, prompt logprobs)."""

from __future__ import annotations

import random

import pytest
from helpers import leftover_bookkeeping

from pipeserve import LLM, SamplingParams
from pipeserve.engine.block_manager import BlockManager


def mixed_requests(rng: random.Random, count: int, shared: list[int]) -> list[tuple[dict, SamplingParams]]:
    """Requests that exercise every per-request structure: choices, penalties (seen tokens at the stages),
    prompt logprobs, logprobs, stops, shared prefixes (cached blocks)."""
    out = []
    for i in range(count):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 40))]
        if i % 3 == 0:
            prompt = shared + prompt
        kind = i % 6
        params = SamplingParams(
            max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 1.0]), seed=i, ignore_eos=True,
            n=2 if kind == 0 else 1,
            presence_penalty=0.5 if kind == 1 else 0.0, repetition_penalty=1.3 if kind == 2 else 1.0,
            prompt_logprobs=1 if kind == 3 else None, logprobs=2 if kind == 4 else None,
            stop_token_ids=[rng.randrange(3, 300) for _ in range(20)] if kind == 5 else None)
        out.append(({"prompt_token_ids": prompt}, params))
    return out


def run(llm: LLM, requests: list[tuple[dict, SamplingParams]], on_output=None) -> None:
    llm.generate([r[0] for r in requests], [r[1] for r in requests], on_output=on_output)


class CallerGone(RuntimeError):
    pass


def run_and_abort(llm: LLM, requests: list[tuple[dict, SamplingParams]]) -> None:
    """The caller fails after a few outputs: every request still running is aborted."""
    seen = []

    def fail(i, out):
        seen.append(i)
        if len(seen) == 25:
            raise CallerGone("the caller went away")

    with pytest.raises(CallerGone):
        run(llm, requests, fail)


def check_returns_to_empty(llm: LLM, seed: int) -> None:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 300) for _ in range(40)]
    for _ in range(3):
        run(llm, mixed_requests(rng, 30, shared))
        assert leftover_bookkeeping(llm.engine) == {}
        run_and_abort(llm, mixed_requests(rng, 30, shared))
        assert leftover_bookkeeping(llm.engine) == {}
    assert all(s.used_blocks == 0 for s in llm.engine.stats())


def test_pp1_returns_to_empty(tiny_model):
    # A pool of 12 blocks per VE makes requests preempt and recompute, and evicts cached prefixes.
    with LLM(tiny_model, dtype="float32", max_model_len=192, num_kv_blocks=12, max_num_batched_tokens=32) as llm:
        check_returns_to_empty(llm, seed=0)


@pytest.mark.slow
def test_pp2_stages_return_to_empty(tiny_model):
    with LLM(tiny_model, dtype="float32", pipeline_parallel_size=2, threads_per_worker=1, max_model_len=192,
             num_kv_blocks=24, max_num_batched_tokens=32) as llm:
        check_returns_to_empty(llm, seed=1)
        assert llm.engine.bookkeeping(stages=True)["stage_requests_held"] == 0


def test_block_manager_forgets_every_request():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    for i in range(500):  # far more requests than blocks: the per-request maps must not keep any of them
        rid = f"r{i}"
        assert bm.allocate(rid, 1 + i % 9)
        bm.cache_full_blocks(rid, [bytes([i % 7, j]) for j in range(len(bm.block_tables[rid]) - 1)])
        bm.free(rid)
    assert bm.bookkeeping() == {"block_tables": 0, "registered_prefixes": 0}
    assert bm.num_used_blocks == 0
