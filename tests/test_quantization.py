"""Weight-only quantization: exact GGUF 4-bit mapping, kernels against their dequantized weights, greedy
agreement with HF on the dequantized model, and the embedded model's logits against its dense path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from helpers import assert_greedy_match, dequantized_hf, hf_greedy

import pipeserve.layers.linear as linear_mod
from pipeserve import LLM, SamplingParams
from pipeserve.config import ModelConfig
from pipeserve.distributed.stage import StageInfo
from pipeserve.layers.quantization import Int4Codes, QuantizedWeight
from pipeserve.loader.gguf_quant import int4_codes
from pipeserve.loader.model_config import load_model_config
from pipeserve.loader.model_loader import load_model
from pipeserve.types import ScheduledRequest, SchedulerOutput
from pipeserve.worker.kv_cache import allocate_kv_caches
from pipeserve.worker.step_inputs import build_model_input

# The quantized kernels multiply in bfloat16: a greedy choice may differ from the float32 dequantized model
# only where that model's two best logits are this close.
QUANT_NEAR_TIE = 0.05
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], [7, 7, 7, 300, 12, 4]]


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_gguf_4bit_blocks_map_exactly(kind):
    rng = np.random.default_rng(int(kind))
    w = (rng.standard_normal((48, 256)) * rng.uniform(1e-3, 4.0, (48, 1))).astype(np.float32)
    w[:, :32] += 3.0  # blocks far from zero: Q4_1's minimum matters
    data = quantize(w, kind)
    codes = int4_codes(data, kind, w.shape)
    assert codes.codes.max() <= 15
    np.testing.assert_array_equal(codes.materialize().numpy(), dequantize(data, kind).reshape(w.shape))


def test_int4_codes_slice_like_a_tensor():
    codes = Int4Codes.quantize(torch.randn(32, 128))
    dense = codes.materialize()
    torch.testing.assert_close(codes[4:9].materialize(), dense[4:9], rtol=0, atol=0)
    torch.testing.assert_close(codes[:, 64:128].materialize(), dense[:, 64:128], rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fall on its 32-wide groups"):
        codes[:, 16:48]


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("out_features", [96, 40])  # 40: not a multiple of the int4 kernel's 16
def test_kernel_multiplies_by_its_dequantized_weight(method, out_features):
    torch.manual_seed(0)
    w = torch.randn(out_features, 128)
    q = QuantizedWeight(method, w, "cpu")
    deq = q.take_dequantized()
    assert (deq - w).abs().max() < (0.2 if method == "int4" else 0.02) * w.abs().max()
    for rows in (1, 3, 17):
        x = torch.randn(rows, 128)
        ref = x.bfloat16().float() @ deq.t()
        torch.testing.assert_close(q.mm(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("family", ["gqa", "llama3_rope_tied"])
def test_quantized_greedy_matches_dequantized_hf(family, method, tiny_models, hf_models):
    reference = dequantized_hf(hf_models[family], method)
    with LLM(tiny_models[family], dtype="float32", quantization=method, max_model_len=256,
             max_num_batched_tokens=16) as llm:  # 16-token chunks: prompts use the dense copy, decodes the kernel
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        expected = hf_greedy(reference, prompt, 16)
        assert_greedy_match(reference, prompt, out.outputs[0].token_ids, expected, near_tie=QUANT_NEAR_TIE)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2)])
def test_quantized_layouts_match_dequantized_hf(layout, tiny_models, hf_models):
    reference = dequantized_hf(hf_models["gqa"], "int4")
    with LLM(tiny_models["gqa"], dtype="float32", quantization="int4", max_model_len=256, threads_per_worker=1,
             **layout) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        expected = hf_greedy(reference, prompt, 12)
        assert_greedy_match(reference, prompt, out.outputs[0].token_ids, expected, near_tie=QUANT_NEAR_TIE)


def test_hf_checkpoints_stay_dense_under_auto(tiny_model):
    cfg = load_model_config(tiny_model, "float32", "auto")
    model = load_model(cfg, StageInfo(0, 1, 0, cfg.num_hidden_layers), 64)
    assert all(getattr(m, "quantized", None) is None for m in model.modules())


def test_unknown_quantization_is_refused(tiny_model):
    with pytest.raises(ValueError, match="quantization 'fp4' is not one of auto, none, int8, int4"):
        load_model_config(tiny_model, "float32", "fp4")


def _all_logits(model, cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one prompt run as a single prefill."""
    req = ScheduledRequest("r", ids, 0, list(range(-(-len(ids) // 16))), SamplingParams())
    inp = build_model_input(SchedulerOutput(0, 0, [req]), 16)
    kv = allocate_kv_caches(cfg, cfg.num_hidden_layers, len(req.block_table), 16)
    with torch.inference_mode():
        return model.compute_logits(model(inp.input_ids, inp.positions, kv, inp.attn, None)).float()


@pytest.mark.slow
def test_embedded_model_logits_stay_near_its_dense_path(monkeypatch):
    """SmolLM2's GGUF under `auto`: Q4_1 layers exact int4, the Q8_0 head int8. The quantized kernels'
    logits (bfloat16 activations) against the same weights dequantized, multiplied densely in float32."""
    cfg = load_model_config(_default_path(), "float32", "auto")
    model = load_model(cfg, StageInfo(0, 1, 0, cfg.num_hidden_layers), 64, disable_progress=True)
    ids = [1, 504, 3458, 282, 4649, 314, 2088, 30, 378, 3458, 282, 4649, 314]
    monkeypatch.setattr(linear_mod, "QUANT_MAX_ROWS", 0)
    dense = _all_logits(model, cfg, ids)
    monkeypatch.setattr(linear_mod, "QUANT_MAX_ROWS", 1 << 30)
    quant = _all_logits(model, cfg, ids)
    spread = dense.std().item()
    assert (quant - dense).abs().max().item() < 0.35 * spread, "quantized logits drifted from the dense path"
    top2 = dense.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    assert torch.equal(quant.argmax(-1)[clear], dense.argmax(-1)[clear])


def _default_path() -> str:
    from pipeserve.loader.default_model import default_model_path

    return default_model_path()
