"""Pipeline parallelism: every layout gives the single-process engine's (and HF's) greedy tokens."""

from __future__ import annotations

import pytest
from helpers import assert_greedy_match, hf_greedy

from pipeserve import LLM, SamplingParams
from pipeserve.executor.base import StepInterrupted
from pipeserve.types import ScheduledRequest, SchedulerOutput

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 150)), [7, 7, 7, 300, 12, 4],
           list(range(200, 260))]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

LAYOUTS = {  # family (layer count) -> layout kwargs
    "pp2_chunked": ("gqa", dict(pipeline_parallel_size=2, max_num_batched_tokens=16)),
    "pp3_uneven_5_layers": ("linear_rope", dict(pipeline_parallel_size=3, max_num_batched_tokens=24)),
    "pp2_tied_explicit_split": ("llama3_rope_tied", dict(pipeline_parallel_size=2, pp_layer_partition="3,1")),
    "pp2_preempting": ("gqa", dict(pipeline_parallel_size=2, num_kv_blocks=34, block_size=8, max_model_len=128,
                                   max_num_batched_tokens=32)),
    "pp2_one_virtual_engine": ("head_dim_bias", dict(pipeline_parallel_size=2, num_virtual_engines=1)),
    # Prompts up to 12 chunks long, their chunks in flight in all three stages at once, under preemption.
    "pp3_long_prompts_preempting": ("gqa", dict(pipeline_parallel_size=3, num_kv_blocks=51, block_size=8,
                                                max_model_len=128, max_num_batched_tokens=8)),
}
PIPELINED = ("pp2_chunked", "pp3_uneven_5_layers", "pp2_preempting", "pp3_long_prompts_preempting")


def run(path: str, **kwargs) -> tuple[list[list[int]], LLM]:
    kwargs = {"max_model_len": 256, "threads_per_worker": 1, **kwargs}
    llm = LLM(path, dtype="float32", seed=0, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipeline_matches_single_process_and_hf(layout, tiny_models, hf_models):
    family, kwargs = LAYOUTS[layout]
    single, llm1 = run(tiny_models[family], max_num_batched_tokens=kwargs.get("max_num_batched_tokens"))
    llm1.shutdown()
    piped, llm = run(tiny_models[family], **kwargs)
    try:
        if "num_kv_blocks" in kwargs:
            assert sum(s.num_preemptions for s in llm.engine.stats()) > 0
        assert len(llm.engine.stats()) == kwargs.get("num_virtual_engines", kwargs["pipeline_parallel_size"])
        if layout in PIPELINED:  # a prompt's chunks were in flight together, up to one per stage
            assert max(s.max_steps_in_flight for s in llm.engine.stats()) == kwargs["pipeline_parallel_size"]
    finally:
        llm.shutdown()
    assert piped == single
    for prompt, ours in zip(PROMPTS, piped, strict=True):
        assert_greedy_match(hf_models[family], prompt, ours, hf_greedy(hf_models[family], prompt, len(ours)))


def test_each_stage_holds_only_its_own_parameters(tiny_models, hf_models):
    for family, pp, split in [("gqa", 2, [3, 1]), ("llama3_rope_tied", 2, [2, 2]), ("linear_rope", 3, [2, 2, 1])]:
        cfg = hf_models[family].config
        hf_total = sum(p.numel() for p in hf_models[family].parameters())  # tied head counted once
        with LLM(tiny_models[family], dtype="float32", pipeline_parallel_size=pp, threads_per_worker=1,
                 pp_layer_partition=",".join(map(str, split))) as llm:
            counts = llm.engine.executor.stage_params
        h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        hd = cfg.head_dim
        layer = sum(p.numel() for p in hf_models[family].model.layers[0].parameters())
        assert layer == h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * h * inter + 2 * h \
            + (0 if not cfg.attention_bias else hd * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + h)
        expected = [n * layer for n in split]
        expected[0] += vocab * h  # embedding
        expected[-1] += h + vocab * h  # final norm + LM head (the tied matrix is loaded again as the head)
        assert counts == expected
        tied_extra = vocab * h if cfg.tie_word_embeddings else 0
        assert sum(counts) == hf_total + tied_extra


def test_stage_that_raises_is_replaced_and_its_step_recomputed(tiny_model, tmp_path):
    """A stage raising on a step is reported with its name and replaced; the step is lost, never the engine.
    The trace marks the recovery on a row of its own."""
    trace = tmp_path / "trace.json"
    llm = LLM(tiny_model, dtype="float32", pipeline_parallel_size=2, threads_per_worker=1, trace_file=str(trace))
    executor = llm.engine.executor
    bad = SchedulerOutput(0, 0, [ScheduledRequest("r", [1, 2, 3], 0, [10**6], GREEDY)])  # block far out of range
    import asyncio

    try:
        with pytest.raises(StepInterrupted, match="pipeline stage 0 on the head node, pid \\d+ failed: .*Error"):
            asyncio.run(asyncio.wait_for(executor.execute(bad), timeout=60))
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY)[0]
        assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
        assert executor.recoveries.restarts_by_stage == {0: 1}
    finally:
        llm.shutdown()
    assert all(executor.launcher.pid(r) is None for r in range(executor.layout.world_size))  # none left running
    import json

    recoveries = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "recovery"]
    assert len(recoveries) == 1 and "pipeline stage 0" in recoveries[0]["args"]["cause"]


def test_bad_partition_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="must give 2 positive layer counts summing to 4"):
        LLM(tiny_model, pipeline_parallel_size=2, pp_layer_partition="3,3")
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        LLM(tiny_model, pipeline_parallel_size=5)


def test_rendezvous_port_in_use_is_a_clear_error(tiny_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot host the rendezvous store on 127.0.0.1:{port} "
                                             f"\\(--master-port\\): .*address already in use"):
            LLM(tiny_model, pipeline_parallel_size=2, threads_per_worker=1, master_port=port)


def test_trace_file_has_every_stage_and_virtual_engine(tiny_model, tmp_path):
    import json

    trace = tmp_path / "trace.json"
    with LLM(tiny_model, dtype="float32", pipeline_parallel_size=2, threads_per_worker=1,
             trace_file=str(trace)) as llm:
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in events} == {0, 1}  # one row per stage
    assert {e["args"]["virtual_engine"] for e in events} == {0, 1}
    assert {e["args"]["kind"] for e in events} >= {"prefill", "decode"}
    assert all(e["dur"] >= 0 for e in events)
    assert (tmp_path / "trace.png").stat().st_size > 0


def test_generate_ended_early_leaves_the_pipeline_consistent(tiny_models):
    """A listener error ends generate() with chunks of long prompts in flight in both stages; the next
    generate() still matches the single-process engine (the stages' per-request state is resent whole)."""
    path = tiny_models["gqa"]
    kwargs = dict(max_num_batched_tokens=16, max_model_len=256, threads_per_worker=1)
    with LLM(path, dtype="float32", seed=0, **kwargs) as llm1:
        expected = [o.outputs[0].token_ids for o in llm1.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]

    def fail(i, out):
        raise RuntimeError("listener went away")

    with LLM(path, dtype="float32", seed=0, pipeline_parallel_size=2, **kwargs) as llm:
        with pytest.raises(RuntimeError, match="listener went away"):
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, on_output=fail)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
