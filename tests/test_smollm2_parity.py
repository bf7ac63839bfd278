"""The embedded SmolLM2-135M, loaded by pipeserve and by HF transformers from the same GGUF file, agrees."""

from __future__ import annotations

import pytest
from helpers import assert_greedy_match, hf_embedded_model, hf_greedy

from pipeserve import LLM, SamplingParams

pytestmark = pytest.mark.slow
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def hf_smollm2():
    return hf_embedded_model()


@pytest.fixture(scope="module")
def smollm2():
    with LLM(dtype="float32", max_model_len=512, max_num_batched_tokens=24, threads_per_worker=1,
             quantization="none") as llm:
        yield llm


def test_smollm2_greedy_matches_hf(smollm2, hf_smollm2):
    tok = smollm2.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Pipeline parallelism splits a model into"]
    chat = tok.apply_chat_template([{"role": "user", "content": "Name a primary colour."}], tokenize=False,
                                   add_generation_prompt=True)
    prompts = [tok.encode(t) for t in texts] + [tok.encode(chat, add_special_tokens=False)]
    # max_num_batched_tokens=24 chunks the longer prompts and mixes the chunks with other requests' decodes.
    outs = smollm2.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        expected = hf_greedy(hf_smollm2, prompt, MAX_TOKENS)
        assert_greedy_match(hf_smollm2, prompt, out.outputs[0].token_ids, expected)


def test_smollm2_text_is_coherent(smollm2):
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert "Paris" in out.text


def test_smollm2_same_with_and_without_prefix_caching(smollm2):
    """Chat conversations sharing a system prompt, at PP=1 (caching on, the module's engine) and PP=2 with a
    KV pool small enough to preempt, caching on and off: the same greedy tokens."""
    tok = smollm2.get_tokenizer()
    system = {"role": "system", "content": "You are a concise assistant who answers in one sentence. " * 3}
    questions = ["Name a primary colour.", "What is two plus two?", "Where is Paris?", "Name a large river."]
    prompts = [tok.encode(tok.apply_chat_template([system, {"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for q in questions]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def tokens(llm: LLM) -> list[list[int]]:
        llm.generate([{"prompt_token_ids": prompts[0]}], params)  # the shared prefix is now cached
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]

    runs = [tokens(smollm2)]
    for caching in (True, False):
        with LLM(dtype="float32", quantization="none", pipeline_parallel_size=2, threads_per_worker=1,
                 max_model_len=128, num_kv_blocks=32, block_size=8, max_num_batched_tokens=32,
                 enable_prefix_caching=caching) as llm:
            runs.append(tokens(llm))
            assert sum(s.num_preemptions for s in llm.engine.stats()) > 0
            assert (sum(s.prefix_cache_hits for s in llm.engine.stats()) > 0) == caching
    assert runs[0] == runs[1] == runs[2]
