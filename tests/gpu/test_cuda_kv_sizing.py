"""The KV pool sized by gpu_memory_utilization on CUDA, run by `make test-gpu` (each skips without CUDA).

Checked here: after start-up (and a few requests, so activations and graphs hold their memory) the device
uses at most the fraction of its memory, give or take SLACK; a larger fraction gives a larger pool by about
the difference; two stages sharing the one GPU start, stay within the fraction together and generate what
one stage does; num_kv_blocks still overrides, without profiling.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_greedy_match

from pipeserve import LLM, SamplingParams
from pipeserve.models.rank_shapes import kv_bytes_per_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 150)), [7, 7, 7, 300, 12, 4]]
MAX_TOKENS = 12
# What the profile cannot see exactly: the caching allocator's rounding of activations, the graph pool
# against its estimate, the cuBLAS workspace of the capture stream, loaded kernel modules.
SLACK = 512 << 20


def run(path: str, **kwargs) -> dict:
    """Greedy outputs, the device's memory in use while the engine still holds everything, and stage stats."""
    with LLM(path, device="cuda", dtype="float32", max_model_len=256, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        stats = llm.engine.executor.collect_stats()
        cfg = llm.config
        per_block = kv_bytes_per_block(cfg.model, cfg.model.num_hidden_layers, cfg.cache.block_size)  # PP=1
        return {"tokens": [o.outputs[0].token_ids for o in outs], "used": total - free, "total": total,
                "stats": stats, "blocks": cfg.num_blocks_per_ve, "per_block": per_block}


def describe(r: dict) -> str:
    gib = float(1 << 30)
    parts = [f"used {r['used'] / gib:.2f} of {r['total'] / gib:.2f} GiB, {r['blocks']} blocks per VE"]
    for s in r["stats"]:
        parts.append(f"rank {s['rank']}: kv {s['kv_bytes'] / gib:.2f} GiB, profile {s['memory_profile']}, graphs "
                     f"reserved {s.get('cuda_graph_reserved_bytes', 0) / gib:.3f} GiB")
    return "; ".join(parts)


@pytest.fixture(scope="module")
def hf_gqa(hf_models):
    return copy.deepcopy(hf_models["gqa"]).to("cuda")


def test_pool_stays_within_the_fraction_and_grows_with_it(tiny_model):
    half = run(tiny_model, gpu_memory_utilization=0.5)
    assert half["used"] <= 0.5 * half["total"] + SLACK, describe(half)
    assert half["stats"][0]["memory_profile"] is not None
    assert half["stats"][0]["kv_bytes"] == (half["blocks"] + 1) * half["per_block"]  # + the scratch block
    less = run(tiny_model, gpu_memory_utilization=0.3)
    assert less["used"] <= 0.3 * less["total"] + SLACK, describe(less)
    kv_half, kv_less = half["stats"][0]["kv_bytes"], less["stats"][0]["kv_bytes"]
    assert kv_half > kv_less, (describe(half), describe(less))
    # The tiny model's weights and steps are small: the pool takes about the whole difference of the fractions.
    assert abs((kv_half - kv_less) - 0.2 * half["total"]) <= 0.02 * half["total"], (describe(half), describe(less))
    assert half["tokens"] == less["tokens"]


def test_two_stages_on_one_gpu_share_its_fraction(tiny_model, hf_gqa):
    """Both stage processes profile the same device and split what the fraction leaves; together they stay
    within it, and they generate what one stage does (near-tie rule: the virtual engines split the batch,
    so decode steps run at other padded sizes)."""
    one = run(tiny_model, gpu_memory_utilization=0.5)
    two = run(tiny_model, gpu_memory_utilization=0.5, pipeline_parallel_size=2)
    assert two["used"] <= 0.5 * two["total"] + SLACK, describe(two)
    profiles = [s["memory_profile"] for s in two["stats"]]
    assert len(profiles) == 2 and profiles[0]["device"] == profiles[1]["device"], describe(two)
    assert all(s["kv_bytes"] > 0 for s in two["stats"])
    for prompt, got, want in zip(PROMPTS, two["tokens"], one["tokens"], strict=True):
        assert_greedy_match(hf_gqa, prompt, got, want)


def test_num_kv_blocks_overrides_the_fraction(tiny_model):
    r = run(tiny_model, num_kv_blocks=64)
    assert r["blocks"] == 64
    stats = r["stats"][0]
    assert stats["memory_profile"] is None  # the count was known: no profiling step ran
    assert stats["kv_bytes"] == 65 * r["per_block"]  # one VE: its 64 blocks and the scratch block
