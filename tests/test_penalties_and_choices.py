"""logit_bias, presence/frequency/repetition penalties and n > 1 choices, checked against HF transformers'
logits processors (repetition penalty, sequence bias) and OpenAI's documented penalty formula."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_greedy_match
from transformers import LogitsProcessor, LogitsProcessorList

from pipeserve import LLM, SamplingParams
from pipeserve.layers.sampler import Sampler

PROMPTS = [list(range(40, 90)) + [7, 8], list(range(40, 90)) + [9], [5, 5, 6, 5, 7, 300, 12]]


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's formula: logit[j] -= frequency * count[j] + presence * (count[j] > 0), over generated tokens."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(input_ids[0, self.prompt_len:], minlength=scores.shape[-1]).float()
        return scores - self.frequency * counts - self.presence * (counts > 0).float()


def hf_greedy_with(model, prompt: list[int], n: int, processors=None, **gen_kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None, logits_processor=LogitsProcessorList(processors or []),
                             **gen_kwargs)
    return out[0, len(prompt):].tolist()


def test_sampler_applies_bias_then_penalties_as_documented():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    s = Sampler(0, ())
    # token 3 leads; a bias of -10 moves the argmax to token 0
    assert s(logits, [SamplingParams(temperature=0, logit_bias={3: -10})], [0])[0].token_id == 0
    # repetition 2.0 over seen tokens {0, 3}: 2.0 -> 1.0 and 3.0 -> 1.5; token 1's -1.0 would double if seen
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert s(logits, [p], [0], [[0, 3]])[0].token_id == 3
    assert s(logits, [SamplingParams(temperature=0, repetition_penalty=8.0)], [0], [[0, 3]])[0].token_id == 2
    # frequency and presence count only the outputs: the last 2 of the seen tokens
    p = SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.6)
    assert s(logits, [p], [0], [[3, 3, 3]])[0].token_id == 3  # no outputs yet: nothing to penalize
    assert s(logits, [p], [2], [[3, 3, 3]])[0].token_id == 0  # 3.0 - 2 * 1.0 - 0.6 = 0.4 < 2.0


def test_penalty_ranges_are_checked():
    for kwargs, field in ((dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency"),
                          (dict(repetition_penalty=0), "repetition_penalty"), (dict(logit_bias={1: 101}), "logit_bias"),
                          (dict(n=0), "n")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm(tiny_models):
    with LLM(tiny_models["gqa"], dtype="float32", max_model_len=256, max_num_batched_tokens=16) as llm:
        yield llm


def run(llm: LLM, params: SamplingParams, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    llm.generate([{"prompt_token_ids": PROMPTS[0][:20]}], SamplingParams(max_tokens=1))  # warm the prefix cache
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def test_repetition_penalty_matches_hf(llm, hf_models):
    model = hf_models["gqa"]
    ours = run(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.7))
    plain = run(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert ours != plain  # the penalty changed something
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert_greedy_match(model, prompt, got, hf_greedy_with(model, prompt, 16, repetition_penalty=1.7))


def test_logit_bias_matches_hf_sequence_bias(llm, hf_models):
    model = hf_models["gqa"]
    bias = {17: 8.0, 23: 5.0, 200: -100.0}
    ours = run(llm, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias=bias))
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ref = hf_greedy_with(model, prompt, 12, sequence_bias={(t,): b for t, b in bias.items()})
        assert_greedy_match(model, prompt, got, ref)


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 1.2), (-0.5, 0.8)])
def test_presence_and_frequency_penalties_match_openai_formula(llm, hf_models, presence, frequency):
    model = hf_models["gqa"]
    ours = run(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=presence,
                                   frequency_penalty=frequency))
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ref = hf_greedy_with(model, prompt, 16, [OpenAIPenalties(len(prompt), presence, frequency)])
        assert_greedy_match(model, prompt, got, ref)


def test_n_choices_are_seeded_apart_and_share_the_prompt(llm):
    prompt = {"prompt_token_ids": list(range(100, 150))}
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    hits = sum(s.prefix_cache_hits for s in llm.engine.stats())
    (out,) = llm.generate([prompt], params)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and out.finished
    choices = [c.token_ids for c in out.outputs]
    assert len({tuple(c) for c in choices}) == 4  # the choice index enters the seed
    # Choice i is what a single request seeded seed + i gives (vLLM's rule), alone or beside others.
    for i, got in enumerate(choices):
        (single,) = llm.generate([prompt], SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8, ignore_eos=True))
        assert single.outputs[0].token_ids == got
    # Choices 1..3 waited for choice 0 to compute the prompt, then took its 3 full blocks from the cache.
    assert sum(s.prefix_cache_hits for s in llm.engine.stats()) - hits >= 3 * 48


def test_n_greedy_choices_agree_and_stream_together(llm):
    seen = []
    (out,) = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(n=3, temperature=0, max_tokens=5,
                                                                             ignore_eos=True),
                          on_output=lambda i, o: seen.append([len(c.token_ids) for c in o.outputs]))
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1 and len(out.outputs) == 3
    assert seen[-1] == [5, 5, 5] and len(seen) > 1


@pytest.mark.slow
def test_penalized_requests_through_pipeline_preemption_and_cached_prefixes(tiny_models):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.7,
                            frequency_penalty=0.7, presence_penalty=0.3, logit_bias={17: 3.0})
    outs = []
    prompts = PROMPTS + [list(range(100, 190)), list(range(150, 240))]  # two of these overflow one VE's blocks
    for kwargs in (dict(), dict(pipeline_parallel_size=2, num_kv_blocks=32, block_size=8, max_model_len=128,
                                max_num_batched_tokens=16, threads_per_worker=1)):
        with LLM(tiny_models["gqa"], dtype="float32", **{"max_model_len": 256, **kwargs}) as llm:
            outs.append(run(llm, params, prompts))
            if kwargs:
                assert sum(s.num_preemptions for s in llm.engine.stats()) > 0
    assert outs[0] == outs[1]
