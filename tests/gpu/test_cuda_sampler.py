"""The device sampler on CUDA (`make test-gpu`): seeded rows independent of the batch, and no host
synchronisation while a step samples, only the one copy of the results."""

from __future__ import annotations

import random

import pytest
import torch

from pipeserve import SamplingParams
from pipeserve.layers.sampler import Sampler
from pipeserve.layers.sampling.host_pack import to_host

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

VOCAB = 128256  # a Llama-3 vocabulary: the kernels run at the size they run at in serving
EOS = 2
TARGETS = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.8, top_p=0.9, seed=2),
           SamplingParams(temperature=1.1, top_k=50, min_p=0.01, seed=3), SamplingParams(temperature=0.0)]
OTHERS = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(top_k=20, seed=9),
          SamplingParams(top_p=0.5, logprobs=5), SamplingParams(temperature=0.7, logit_bias={5: 3.0}, seed=4)]


def logits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(rows, VOCAB, device="cuda", generator=g) * 3).to(torch.bfloat16)


def test_cuda_seeded_row_same_alone_and_in_any_batch():
    rng = random.Random(0)
    rows = logits(len(TARGETS), seed=1)
    for t, p in enumerate(TARGETS):
        for n_out in (0, 5):
            alone = Sampler(0, (EOS,))(rows[t:t + 1], [p], [n_out])[0].token_id
            for size in (1, 7, 63, 255):  # batch sizes, hence kernel launch shapes, differ
                others = logits(size, seed=size)
                kinds = [rng.choice(OTHERS) for _ in range(size)]
                pos = rng.randint(0, size)
                batch = torch.cat([others[:pos], rows[t:t + 1], others[pos:]])
                params = kinds[:pos] + [p] + kinds[pos:]
                outs = [rng.randint(0, 9) for _ in range(size)]
                got = Sampler(rng.randint(0, 9), (EOS,))(batch, params, outs[:pos] + [n_out] + outs[pos:])
                assert got[pos].token_id == alone, (t, n_out, size, pos)


def test_cuda_sampling_does_not_synchronise_before_its_one_copy():
    batch = logits(64, seed=3)
    params = [TARGETS[i % len(TARGETS)] if i % 2 else OTHERS[i % len(OTHERS)] for i in range(64)]
    params[10] = SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=4, seed=7)
    seen = [[1, 2, 3, 4]] * 64
    sampler = Sampler(0, (EOS,))
    sampler(batch, params, [1] * 64, seen)  # made once: the vocabulary's token hashes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids, packed, _ = sampler.sample(batch, params, [1] * 64, seen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    host = to_host(packed)
    assert host.is_pinned()
    assert host[:64].long().tolist() == ids.tolist()
