"""Prompt logprobs (SamplingParams.prompt_logprobs, and completions' echo with logprobs) against HF's own
log-softmax of the prompt's logits, over chunked prefill, pipeline stages and preemption."""

from __future__ import annotations

import pytest
import torch

from pipeserve import LLM, SamplingParams

PROMPTS = [list(range(40, 90)), [5, 6, 7, 8], list(range(100, 170)), [9]]


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """(len - 1, vocab): row i is the distribution of prompt token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(dim=-1)


def check(outs, model, k: int) -> None:
    for prompt, out in zip(PROMPTS, outs, strict=True):
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == len(prompt) and lps[0] is None
        ref = hf_prompt_logprobs(model, prompt)
        for i, entry in enumerate(lps[1:]):
            token = prompt[i + 1]
            assert entry[token].logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
            assert entry[token].rank == int((ref[i] > ref[i, token]).sum()) + 1
            top = ref[i].topk(k).indices.tolist()
            assert all(t in entry for t in top) and len(entry) <= k + 1


def run(path: str, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    with LLM(path, dtype="float32", **{"max_model_len": 256, "max_num_batched_tokens": 16, **kwargs}) as llm:
        llm.generate([{"prompt_token_ids": PROMPTS[2]}], SamplingParams(max_tokens=1))  # cache it: must not be used
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        preemptions = sum(s.num_preemptions for s in llm.engine.stats())
    return outs, preemptions


def test_prompt_logprobs_match_hf_over_chunks(tiny_models, hf_models):
    outs, _ = run(tiny_models["gqa"])
    check(outs, hf_models["gqa"], 2)
    assert all(o.num_cached_tokens == 0 for o in outs)  # a scored prompt is computed whole


@pytest.mark.slow
def test_prompt_logprobs_match_hf_across_stages_under_preemption(tiny_models, hf_models):
    outs, preemptions = run(tiny_models["head_dim_bias"], pipeline_parallel_size=2, threads_per_worker=1,
                            num_kv_blocks=24, block_size=8, max_model_len=96)
    assert preemptions > 0
    check(outs, hf_models["head_dim_bias"], 2)
