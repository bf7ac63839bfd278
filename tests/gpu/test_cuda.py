"""CUDA checks, run by `make test-gpu` on a machine with a GPU (each skips with a reason elsewhere).

They need only torch and transformers (the GPU machines have no gguf, FastAPI or package index), and they
use the tiny random checkpoints the session fixtures make, never the 98 MB GGUF.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_greedy_match, dequantized_hf, hf_greedy

from pipeserve import LLM, SamplingParams
from pipeserve.layers.quantization import QuantizedWeight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 150)), [7, 7, 7, 300, 12, 4]]
MAX_TOKENS = 16
QUANT_NEAR_TIE = 0.05  # the quantized kernels multiply in bfloat16 (tests/test_quantization.py)


def generate(path: str, **kwargs) -> list[list[int]]:
    with LLM(path, device="cuda", dtype="float32", max_model_len=256, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def hf_cuda(hf_models):
    return {name: copy.deepcopy(m).to("cuda") for name, m in hf_models.items()}


@pytest.mark.parametrize("family", ["gqa", "head_dim_bias", "llama3_rope_tied", "linear_rope"])
def test_cuda_greedy_matches_hf_on_cuda(family, tiny_models, hf_cuda):
    """Paged attention (chunked prefill, batched decodes) on CUDA against HF on CUDA, float32."""
    ours = generate(tiny_models[family], max_num_batched_tokens=16)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert_greedy_match(hf_cuda[family], prompt, got, hf_greedy(hf_cuda[family], prompt, MAX_TOKENS))


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_cuda_quantized_kernel_uses_its_dequantized_weight(method):
    torch.manual_seed(0)
    w = torch.randn(200, 512, device="cuda")  # 200 rows: padded to the int4 kernel's multiple
    q = QuantizedWeight(method, w, "cuda")
    deq = q.take_dequantized().to("cuda")
    for rows in (1, 5, 64):
        x = torch.randn(rows, 512, device="cuda")
        ref = x.bfloat16().float() @ deq.t()
        torch.testing.assert_close(q.mm(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_cuda_quantized_greedy_matches_dequantized_hf(tiny_models, hf_cuda):
    reference = dequantized_hf(hf_cuda["gqa"], "int4")
    ours = generate(tiny_models["gqa"], quantization="int4", max_num_batched_tokens=16)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert_greedy_match(reference, prompt, got, hf_greedy(reference, prompt, MAX_TOKENS), near_tie=QUANT_NEAR_TIE)


def test_cuda_two_stages_on_one_gpu_match_one_stage(tiny_models):
    """PP=2 with both ranks on the one GPU: NCCL refuses two ranks per device, so the stages exchange
    activations through host memory over gloo. (NCCL between stages needs two GPUs: not checked here.)"""
    one = generate(tiny_models["gqa"])
    two = generate(tiny_models["gqa"], pipeline_parallel_size=2)
    assert two == one


def test_cuda_bfloat16_runs(tiny_models):
    with LLM(tiny_models["gqa"], device="cuda", dtype="bfloat16", max_model_len=256) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
