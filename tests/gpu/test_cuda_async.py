"""Async scheduling on CUDA, run by `make test-gpu` (each skips without CUDA).

Checked here: outputs with async scheduling (the CUDA default) equal the synchronous engine's under CUDA
graphs; decodes really are planned ahead; a graph-replayed decode step whose input ids are placeholders is
issued without any synchronisation (its ids reach the host later, through PendingStep) and samples what the
same step with the real ids samples.
"""

from __future__ import annotations

import pytest
import torch
from decode_driver import issue_without_sync, make_runners, placeholder_step, run_scenario

from pipeserve import LLM, SamplingParams
from pipeserve.worker.sampled_ids import PendingStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 150)), [7, 7, 7, 300, 12, 4]]


def generate(path: str, params, **kwargs):
    with LLM(path, device="cuda", dtype="float32", max_model_len=256, max_num_seqs=8, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        return ([[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs], llm.engine.stats(),
                llm.engine.executor.collect_stats()[0])


def test_async_equals_sync_under_graphs(tiny_model):
    reference, _, _ = generate(tiny_model, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    stop = reference[0][0][0][5]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, top_k=20, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop], logprobs=1),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, n=2)]
    sync, sync_stats, _ = generate(tiny_model, params, async_scheduling=False)
    ours, stats, stage = generate(tiny_model, params)  # async scheduling is CUDA's default
    assert ours == sync
    assert sum(s.num_planned_ahead for s in stats) > 0 and sum(s.num_planned_ahead for s in sync_stats) == 0
    assert stage["cuda_graph_replays"] > 0


def test_a_placeholder_step_replays_without_synchronising(tiny_model):
    runners = make_runners(tiny_model, 1, device="cuda", enforce_eager=False)
    _, scenario = run_scenario(runners, execute=True)
    runner, states, sched, expected = placeholder_step(runners, scenario, "cuda")
    with torch.inference_mode():
        replays = runner.graphs.replays
        pending = issue_without_sync(runner, sched, states.batch)
        assert isinstance(pending, PendingStep) and runner.graphs.replays == replays + 1
        assert pending.result().sampled == expected
