"""Greedy float32 outputs match HF transformers token for token, for every config family and batching mode."""

from __future__ import annotations

import pytest
from helpers import assert_greedy_match, hf_greedy

from pipeserve import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 150)), [7, 7, 7, 300, 12, 4]]
MAX_TOKENS = 24

MODES = {
    "chunked": dict(max_num_batched_tokens=16),
    "whole_prompts": dict(enable_chunked_prefill=False, max_num_batched_tokens=256),
    # 17 blocks of 8 tokens cannot hold five requests of up to 124 tokens at once: preemption must happen.
    "preempting": dict(num_kv_blocks=17, block_size=8, max_num_batched_tokens=32, max_model_len=128),
}


@pytest.fixture(scope="module")
def hf_expected(hf_models):
    return {name: [hf_greedy(m, p, MAX_TOKENS) for p in PROMPTS] for name, m in hf_models.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["gqa", "head_dim_bias", "llama3_rope_tied", "linear_rope"])
def test_greedy_matches_hf(family, mode, tiny_models, hf_models, hf_expected):
    kwargs = {"max_model_len": 256, **MODES[mode]}
    with LLM(tiny_models[family], dtype="float32", seed=0, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        if mode == "preempting":
            assert llm.engine.stats()[0].num_preemptions > 0, "the small cache was meant to force preemption"
    for prompt, out, expected in zip(PROMPTS, outs, hf_expected[family], strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].finish_reason == "length"
        assert_greedy_match(hf_models[family], prompt, out.outputs[0].token_ids, expected)
