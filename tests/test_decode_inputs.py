"""Persistent decode inputs and the padded static-buffer decode path (what CUDA graphs replay), on the CPU.

The static path pads a decode step to the next captured batch size and runs on buffers that live as long as
the stage; where there is no CUDA it runs eagerly, so these tests check it against the unpadded path."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from decode_driver import MIXED, HostTransfers, make_runners, run_scenario

from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.entrypoints.engine_flags import add_engine_flags, engine_kwargs
from pipeserve.types import PLACEHOLDER
from pipeserve.worker.cuda_graphs import capture_sizes
from pipeserve.worker.gpu_timeline import idle_fraction
from pipeserve.worker.input_batch import InputBatch
from pipeserve.worker.sampled_ids import SampledIds


@pytest.mark.parametrize("stages", [1, 2])
def test_padded_static_decode_equals_unpadded(tiny_model, stages):
    """Same tokens, logits allclose at every step, and the KV caches agree outside the scratch block (the
    padding rows wrote nowhere else)."""
    eager_runners, static_runners = make_runners(tiny_model, stages), make_runners(tiny_model, stages, static=True)
    eager, eager_run = run_scenario(eager_runners)
    static, static_run = run_scenario(static_runners)
    assert static == eager
    assert eager_run.static_steps == 0
    assert static_run.static_steps == 8  # every pure-decode step: 3 before the mixed step, 5 after it
    for a, b in zip(eager_run.logits, static_run.logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for e, s in zip(eager_runners, static_runners, strict=True):
        for layer_e, layer_s in zip(e.kv_caches[1], s.kv_caches[1], strict=True):
            torch.testing.assert_close(layer_s[:, :, :-1], layer_e[:, :, :-1], rtol=1e-4, atol=1e-4)
    assert all(r.graphs.stats()["cuda_graph_count"] == 0 for r in static_runners)  # no CUDA: nothing captured


@pytest.mark.parametrize("params", [{}, MIXED], ids=["greedy", "mixed"])
def test_static_decode_samples_from_the_logits_of_its_graph(tiny_model, monkeypatch, params):
    """The static path's LM head and argmax run with the layers (in the graph on CUDA): the runner samples
    the same tokens and logprobs as the eager path, and a step of plain-greedy requests reads only the argmax
    ids (the sampler is not called)."""
    eager, eager_run = run_scenario(make_runners(tiny_model), params, execute=True)
    runners = make_runners(tiny_model, static=True)
    calls = {"static": 0, "sampler": 0}
    run, call = runners[0].graphs.run, type(runners[0].sampler).issue

    def counted_run(*args, **kwargs):
        calls["static"] += 1
        return run(*args, **kwargs)

    def counted_call(*args, **kwargs):
        calls["sampler"] += 1
        return call(*args, **kwargs)

    monkeypatch.setattr(runners[0].graphs, "run", counted_run)
    monkeypatch.setattr(type(runners[0].sampler), "issue", counted_call)
    static, static_run = run_scenario(runners, params, execute=True)
    assert static == eager and calls["static"] == 8
    assert calls["sampler"] == (2 if not params else 10)  # the two prefill steps; with MIXED every step
    for a, b in zip(eager_run.outputs, static_run.outputs, strict=True):
        assert a.sampled == b.sampled and a.logprobs.keys() == b.logprobs.keys()
        for req_id, record in a.logprobs.items():
            assert b.logprobs[req_id].logprob == pytest.approx(record.logprob, abs=1e-4)
            assert [t for t, _ in b.logprobs[req_id].top_logprobs] == [t for t, _ in record.top_logprobs]


def test_capture_sizes():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(256)[-3:] == [224, 240, 256]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1) == [1]


def test_input_batch_rows_are_reused_and_grow():
    batch = InputBatch(rows=2, max_blocks=2)
    batch.add("a", [3, 4])
    batch.add("b", [5])
    batch.append("b", [6, 7, 8])  # wider than the array: the columns grow
    batch.add("c", [9])  # a third request: the rows grow
    assert batch.block_tables[batch.rows(["b"])[0], :4].tolist() == [5, 6, 7, 8]
    assert batch.block_tables[batch.rows(["a"])[0], :2].tolist() == [3, 4]
    row_a = batch.row_of["a"]
    batch.remove("a")
    batch.add("d", [1])  # takes the freed row
    assert batch.row_of["d"] == row_a and batch.num_blocks[row_a] == 1
    batch.add("d", [2, 2])  # sent whole again (a preemption): the row restarts
    assert batch.block_tables[row_a, :2].tolist() == [2, 2] and len(batch) == 3
    batch.clear()
    assert len(batch) == 0 and not batch.num_blocks.any()
    with pytest.raises(KeyError):
        batch.rows(["b"])


@pytest.mark.parametrize("static", [False, True])
def test_a_decode_step_reads_nothing_back_before_sampling(tiny_model, monkeypatch, static):
    """Inputs, forward and LM head of a decode step take no value from a tensor: the sampled ids are the
    step's only transfer to the host, and they are the sampler's (layers/sampler.py)."""
    runners = make_runners(tiny_model, 1, static=static)
    _, scenario = run_scenario(runners)  # requests a, c, d are decoding
    runner, states = runners[0], scenario.states[0]
    plan = scenario._plan([], [])
    with torch.inference_mode():
        sched = states.resolve(plan)
        counter = HostTransfers(monkeypatch)
        inp, hidden = runner.run_model(sched, None, states.batch)
        logits = runner.model.compute_logits(hidden)
        monkeypatch.undo()
    assert (inp is None) == static and logits.shape[0] == 3
    assert counter.calls == []


@pytest.mark.parametrize("static", [False, True])
def test_a_decode_step_planned_ahead_takes_its_ids_on_the_device(tiny_model, monkeypatch, static):
    """Async scheduling: decodes whose input id is a placeholder read the id the stage sampled last for their
    row (sampled_ids.py), still without reading anything back; the other rows keep the plan's ids."""
    runners = make_runners(tiny_model, 1, static=static)
    _, scenario = run_scenario(runners)  # requests a, c, d are decoding
    runner, states = runners[0], scenario.states[0]
    runner.sampled_ids = SampledIds("cpu")
    plan = scenario._plan([], [])
    real = list(plan.decodes.token_ids)
    with torch.inference_mode():
        _, hidden = runner.run_model(states.resolve(plan), None, states.batch)
        expected = runner.model.compute_logits(hidden).clone()
        held = [t if i != 1 else 0 for i, t in enumerate(real)]  # a wrong id where the plan has the real one
        runner.sampled_ids.record(torch.from_numpy(states.batch.rows(plan.decodes.req_ids)), torch.tensor(held))
        plan.decodes.token_ids = [PLACEHOLDER if i != 1 else t for i, t in enumerate(real)]
        sched = states.resolve(plan)
        counter = HostTransfers(monkeypatch)
        inp, hidden = runner.run_model(sched, None, states.batch)
        logits = runner.model.compute_logits(hidden)
        monkeypatch.undo()
    assert (inp is None) == static and counter.calls == []
    torch.testing.assert_close(logits, expected)


def test_enforce_eager_flag():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert engine_kwargs(parser.parse_args(["--enforce-eager"]))["enforce_eager"] is True
    assert engine_kwargs(parser.parse_args([]))["enforce_eager"] is False
    assert EngineArgs().enforce_eager is False


def test_decode_buffers_refuse_a_batch_past_their_size(tiny_model):
    runner = make_runners(tiny_model, 1, max_num_seqs=2)[0]
    with pytest.raises(ValueError, match="exceeds the buffers"):
        runner.decode_inputs.fill(InputBatch(), [], 3, 1)
    assert np.all(runner.decode_inputs._int[:2] == 1)  # untouched rows stay padding


def test_cpu_defaults_stay_put(tiny_model):
    sched = EngineArgs(model=tiny_model, device="cpu").create_engine_config().scheduler
    assert (sched.max_num_seqs, sched.max_num_batched_tokens) == (64, 512)
    sched = EngineArgs(model=tiny_model, device="cpu", enable_chunked_prefill=False).create_engine_config().scheduler
    assert sched.max_num_batched_tokens == sched.max_model_len


def test_idle_fraction_counts_gaps_between_consecutive_steps_of_a_kind():
    spans = [(0, 0, "prefill", 0.0, 10.0), (1, 0, "decode", 12.0, 15.0), (2, 0, "decode", 16.0, 19.0),
             (3, 0, "mixed", 30.0, 40.0), (4, 0, "decode", 41.0, 44.0), (5, 0, "decode", 46.0, 49.0)]
    # Pairs (1, 2) and (4, 5): gaps 1 and 2, their second steps 3 ms each.
    assert idle_fraction(spans) == pytest.approx(3 / 9)
    assert idle_fraction(spans[:2]) is None
