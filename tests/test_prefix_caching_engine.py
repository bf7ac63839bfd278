"""Prefix caching end to end on tiny checkpoints: requests that reuse cached KV give HF's greedy tokens, in
one process and across pipeline stages, under chunked prefill and preemption."""

from __future__ import annotations

import pytest
from helpers import assert_greedy_match, hf_greedy

from pipeserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SYSTEM = list(range(40, 90))  # a 50-token shared header: 3 full blocks of 16
# Second-wave prompts: the header plus different questions, one prompt repeated whole, one unrelated.
WAVE = [SYSTEM + [5, 6, 7], SYSTEM + list(range(200, 230)), SYSTEM + [9], SYSTEM + [5, 6, 7], [300, 301, 302]]
FIRST = SYSTEM + [1]  # computes the header, for the wave to find in the cache


def generate(llm: LLM, prompts: list[list[int]]):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)


def check_waves(path: str, hf_model, wave: list[list[int]] = WAVE, expect_preemption: bool = False,
                **kwargs) -> None:
    kwargs = {"max_model_len": 256, "threads_per_worker": 1, **kwargs}
    with LLM(path, dtype="float32", **kwargs) as llm:
        first = generate(llm, [FIRST])[0]
        assert first.num_cached_tokens == 0
        outs = generate(llm, wave)
        stats = llm.engine.stats()
        hits = sum(s.prefix_cache_hits for s in stats)
        preemptions = sum(s.num_preemptions for s in stats)
    assert (preemptions > 0) == expect_preemption
    for prompt, out in zip(wave, outs, strict=True):
        ours = out.outputs[0].token_ids
        assert_greedy_match(hf_model, prompt, ours, hf_greedy(hf_model, prompt, len(ours)))
    assert hits >= 48 and any(o.num_cached_tokens >= 48 for o in outs)
    assert outs[len(WAVE) - 1].num_cached_tokens == 0  # nothing of it was ever computed
    assert all(s.used_blocks == 0 for s in stats)  # idle: no block in use, the prefixes stay cached
    assert sum(s.cached_blocks for s in stats) > 0


def test_cached_prefixes_give_hf_tokens_in_one_process(tiny_models, hf_models):
    check_waves(tiny_models["gqa"], hf_models["gqa"], max_num_batched_tokens=16)


def test_outputs_do_not_depend_on_prefix_caching(tiny_models):
    path = tiny_models["head_dim_bias"]
    runs = []
    for caching in (True, False):
        with LLM(path, dtype="float32", max_model_len=256, enable_prefix_caching=caching) as llm:
            generate(llm, [FIRST])
            runs.append([o.outputs[0].token_ids for o in generate(llm, WAVE)])
            # With caching every prompt token is looked up once, at admission (no request is preempted here).
            queries = sum(s.prefix_cache_queries for s in llm.engine.stats())
            assert queries == (sum(map(len, [FIRST, *WAVE])) if caching else 0)
    assert runs[0] == runs[1]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2_chunked", "pp2_preempting"])
def test_cached_prefixes_give_hf_tokens_across_stages(layout, tiny_models, hf_models):
    kwargs = dict(pipeline_parallel_size=2, max_num_batched_tokens=16)
    wave = WAVE
    if layout == "pp2_preempting":  # 16 blocks of 8 per virtual engine; two long prompts cannot share one
        kwargs.update(num_kv_blocks=32, block_size=8, max_num_batched_tokens=32, max_model_len=128)
        wave = WAVE + [list(range(100, 190)), list(range(150, 240)), SYSTEM + list(range(250, 290))]
    check_waves(tiny_models["gqa"], hf_models["gqa"], wave, layout == "pp2_preempting", **kwargs)
