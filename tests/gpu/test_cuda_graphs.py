"""CUDA graphs for decode steps, run by `make test-gpu` (each skips without CUDA).

Graphs replay pure-decode steps at captured batch sizes, padded with rows that point at the scratch block.
Checked here: replays really happen; a replayed step synchronises with the host only for the sampled ids;
graph decode equals the padded eager path (same shapes) token for token, and the unpadded eager path under
the near-tie rule of the parity tests; requests finishing and arriving mid-batch; PP=2 on the one GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from decode_driver import MIXED, make_runners, run_scenario
from helpers import assert_greedy_match, hf_greedy

from pipeserve import LLM, SamplingParams
from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.worker.cuda_graphs import capture_sizes
from pipeserve.worker.gpu_timeline import idle_fraction

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 150)), [7, 7, 7, 300, 12, 4]]
MAX_TOKENS = [16, 5, 12, 9, 16]  # requests finish at different steps


def generate(path: str, **kwargs) -> tuple[list[list[int]], list[dict]]:
    """Greedy outputs of PROMPTS and every stage's stats (graph counters among them)."""
    with LLM(path, device="cuda", dtype="float32", max_model_len=256, **kwargs) as llm:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        stats = llm.engine.executor.collect_stats()
    return [o.outputs[0].token_ids for o in outs], stats


@pytest.fixture(scope="module")
def hf_gqa(hf_models):
    return copy.deepcopy(hf_models["gqa"]).to("cuda")


def test_gpu_defaults(tiny_model):
    sched = EngineArgs(model=tiny_model, device="cuda").create_engine_config().scheduler
    assert (sched.max_num_seqs, sched.max_num_batched_tokens) == (256, 8192)


def test_graphs_are_captured_and_replayed(tiny_model):
    _, stats = generate(tiny_model, max_num_seqs=8, record_steps=True)
    (stage,) = stats
    fraction = idle_fraction(stage["gpu_spans"])  # the benchmark's measurement of GPU waits between decodes
    assert fraction is not None and 0.0 <= fraction < 1.0
    assert stage["cuda_graph_sizes"] == capture_sizes(8) == [1, 2, 4, 8]
    assert stage["cuda_graph_count"] == 4  # one virtual engine
    assert stage["cuda_graph_replays"] > 0
    assert stage["cuda_graph_capture_s"] > 0
    _, eager_stats = generate(tiny_model, max_num_seqs=8, enforce_eager=True)
    assert "cuda_graph_replays" not in eager_stats[0]


def test_replayed_decode_step_synchronises_only_for_the_sampled_ids(tiny_model):
    """Inputs, graph replay, LM head and argmax raise nothing under sync debug mode "error"; copying the ids
    to the host, the step's one transfer, does raise there (so the mode was armed)."""
    (runner,) = make_runners(tiny_model, 1, device="cuda", enforce_eager=False)
    _, scenario = run_scenario([runner])
    assert scenario.static_steps > 0
    sched = scenario.states[0].resolve(scenario._plan([], []))
    replays = runner.graphs.replays
    torch.cuda.synchronize()
    with torch.inference_mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            inp, hidden = runner.run_model(sched, None, scenario.states[0].batch)
            ids = runner.model.compute_logits(hidden).argmax(dim=-1)  # (3,) on the device
            with pytest.raises(RuntimeError, match="synchroniz"):
                ids.cpu()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert inp is None and runner.graphs.replays == replays + 1
    assert ids.shape == (3,)


@pytest.mark.parametrize("params", [{}, MIXED], ids=["greedy", "mixed"])
def test_graph_step_samples_as_the_eager_step(tiny_model, params):
    """Through ModelRunner.execute: the graph's LM head and argmax (plain-greedy steps) and its logits (the
    other steps: logprobs, penalties, seeds) give the tokens and logprobs of the eager path."""
    want, eager_run = run_scenario(make_runners(tiny_model, 1, device="cuda"), params, execute=True)
    graphs = make_runners(tiny_model, 1, device="cuda", enforce_eager=False)
    got, graph_run = run_scenario(graphs, params, execute=True)
    assert got == want and graphs[0].graphs.replays == 8
    for a, b in zip(eager_run.outputs, graph_run.outputs, strict=True):
        assert a.logprobs.keys() == b.logprobs.keys()
        for req_id, record in a.logprobs.items():
            assert b.logprobs[req_id].logprob == pytest.approx(record.logprob, abs=1e-4)


@pytest.mark.parametrize("stages", [1, 2])
def test_graph_decode_equals_padded_eager_decode(tiny_model, stages):
    """The same padded shapes replayed from graphs and run eagerly: the same tokens, logits all but equal;
    a request finishing and one arriving mid-batch included (decode_driver.Scenario)."""
    graphs = make_runners(tiny_model, stages, device="cuda", enforce_eager=False)
    padded = make_runners(tiny_model, stages, device="cuda", static=True, capture=False)
    got, graph_run = run_scenario(graphs)
    want, padded_run = run_scenario(padded)
    assert got == want
    assert graph_run.static_steps == padded_run.static_steps == 8
    assert all(r.graphs.replays == 8 for r in graphs) and all(not r.graphs.replays for r in padded)
    for a, b in zip(padded_run.logits, graph_run.logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_graph_decode_equals_unpadded_eager_decode(tiny_model, hf_gqa):
    """Graphs against --enforce-eager through the engine (max_num_seqs=3: requests wait, then arrive in the
    batch as others finish): equal, except past a near-tie in HF's logits."""
    graph_tokens, stats = generate(tiny_model, max_num_seqs=3)
    eager_tokens, _ = generate(tiny_model, max_num_seqs=3, enforce_eager=True)
    assert stats[0]["cuda_graph_replays"] > 0
    for prompt, got, want in zip(PROMPTS, graph_tokens, eager_tokens, strict=True):
        assert_greedy_match(hf_gqa, prompt, got, want)
        assert_greedy_match(hf_gqa, prompt, got, hf_greedy(hf_gqa, prompt, len(got)))


def test_two_stages_on_one_gpu_with_graphs_match_one_stage(tiny_model, hf_gqa):
    """Both stages replay graphs (one set per virtual engine). The two virtual engines split the batch, so
    steps run at other padded sizes than at PP=1: equal, except past a near-tie in HF's logits."""
    one, _ = generate(tiny_model)
    two, stats = generate(tiny_model, pipeline_parallel_size=2)
    for prompt, got, want in zip(PROMPTS, two, one, strict=True):
        assert_greedy_match(hf_gqa, prompt, got, want)
    assert len(stats) == 2 and all(s["cuda_graph_replays"] > 0 for s in stats)
    assert all(s["cuda_graph_count"] == 2 * len(s["cuda_graph_sizes"]) for s in stats)  # two virtual engines
