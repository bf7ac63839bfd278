"""Sampling: the `Sampler` on hand-made logits (no model), then seeds and logprobs through `LLM.generate`."""

from __future__ import annotations

import math

import pytest
import torch

from pipeserve import LLM, SamplingParams
from pipeserve.layers.sampler import Sampler

EOS = 2


def sampler(seed: int = 0) -> Sampler:
    return Sampler(seed, (EOS,))


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def tokens(s: Sampler, logits: torch.Tensor, params: list[SamplingParams], num_outputs: list[int] | None = None):
    out = s(logits.clone(), params, num_outputs if num_outputs is not None else [0] * len(params))
    assert len(out) == len(params)
    return [t.token_id for t in out]


def frequencies(ids: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(ids), minlength=vocab).double() / len(ids)


# ---- filters -------------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(6, 97)
    got = tokens(sampler(), logits, [SamplingParams(temperature=0.0)] * 6)
    assert got == logits.argmax(dim=-1).tolist()


def test_greedy_ignores_filters_and_seed():
    logits = random_logits(4, 50, seed=1)
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=i) for i in range(4)]
    assert tokens(sampler(), logits, params, [3, 0, 7, 1]) == logits.argmax(dim=-1).tolist()


def test_top_k_1_equals_greedy():
    logits = random_logits(64, 80, seed=2, scale=0.5)  # flat: plain sampling would rarely pick the argmax
    params = [SamplingParams(temperature=1.5, top_k=1, seed=None if i % 2 else i) for i in range(64)]
    assert tokens(sampler(), logits, params, list(range(64))) == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_only_the_k_most_likely():
    logits = random_logits(1, 60, seed=3, scale=0.3).repeat(3000, 1)
    allowed = set(logits[0].topk(4).indices.tolist())
    got = tokens(sampler(), logits, [SamplingParams(temperature=1.0, top_k=4)] * 3000)
    assert set(got) == allowed  # never outside, and every one of the k is reachable


def test_tiny_top_p_keeps_only_the_top_token():
    logits = random_logits(64, 80, seed=4, scale=0.5)
    params = [SamplingParams(temperature=1.0, top_p=1e-6, seed=None if i % 2 else i) for i in range(64)]
    assert tokens(sampler(), logits, params, list(range(64))) == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_smallest_prefix_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    got = tokens(sampler(), logits, [SamplingParams(temperature=1.0, top_p=0.7)] * 4000)
    assert set(got) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    freq = frequencies(got, 4)
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.03


def test_min_p_filters_relative_to_the_top_token():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    got = tokens(sampler(), logits, [SamplingParams(temperature=1.0, min_p=0.5)] * 4000)
    assert set(got) == {0, 1}  # kept: p >= 0.5 * 0.5
    freq = frequencies(got, 4)
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.03
    got = tokens(sampler(), logits, [SamplingParams(temperature=1.0, min_p=0.2)] * 4000)
    assert set(got) == {0, 1, 2}  # 0.15 >= 0.1 > 0.05


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_sampling_follows_softmax(temperature):
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    got = tokens(sampler(seed=7), base.repeat(n, 1), [SamplingParams(temperature=temperature)] * n)
    expected = (base / temperature).softmax(dim=-1).double()
    # ~6 standard deviations of a frequency over 20000 draws; the seed is fixed, so this cannot flake.
    assert (frequencies(got, 6) - expected).abs().max().item() < 0.02


def test_unseeded_rows_draw_from_the_engine_seed():
    logits = random_logits(1, 100, scale=0.3).repeat(50, 1)
    params = [SamplingParams(temperature=1.0)] * 50
    a = tokens(sampler(seed=11), logits, params)
    assert a == tokens(sampler(seed=11), logits, params)  # reproducible from the engine seed
    assert a != tokens(sampler(seed=12), logits, params)
    assert len(set(a)) > 10  # successive rows draw fresh randomness


@pytest.mark.parametrize("temperature", [
    1e-5,
    1e-30,
    1e-38,
])
def test_tiny_positive_temperature_acts_greedy(temperature):
    logits = random_logits(6, 50, seed=12)
    got = tokens(sampler(), logits, [SamplingParams(temperature=temperature, seed=i) for i in range(6)])
    assert got == logits.argmax(dim=-1).tolist()


# ---- seeds ---------------------------------------------------------------------------------------------


def test_seeded_row_is_independent_of_batch_and_position():
    vocab = 500
    row = random_logits(1, vocab, seed=5, scale=0.5)
    for seed, n_out in [(0, 0), (1, 0), (42, 3), (12345, 17), (2**40, 1)]:
        p = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
        alone = tokens(sampler(), row, [p], [n_out])[0]
        for pos in range(4):
            others = random_logits(3, vocab, seed=100 + pos)
            batch = torch.cat([others[:pos], row, others[pos:]])
            other_params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
                            SamplingParams(temperature=0.7, top_k=5, seed=seed + 1)]
            params = other_params[:pos] + [p] + other_params[pos:]
            n_outs = [5, 0, n_out][:pos] + [n_out] + [5, 0, n_out][pos:]
            # a fresh sampler, and one that has made unseeded draws: neither may matter
            for s in (sampler(seed=pos), sampler(seed=99)):
                tokens(s, random_logits(2, vocab), [SamplingParams(temperature=1.0)] * 2)
                assert tokens(s, batch, params, n_outs)[pos] == alone, (seed, n_out, pos)


def test_seeded_draws_differ_across_output_index_and_seed():
    vocab = 40
    logits = torch.zeros(1, vocab)  # uniform: each draw is one of 40 equally likely tokens
    p = SamplingParams(temperature=1.0, seed=1234)
    s = sampler()
    seq = [tokens(s, logits, [p], [i])[0] for i in range(400)]
    assert seq == [tokens(s, logits, [p], [i])[0] for i in range(400)]  # reproducible
    # independent draws: every token turns up, none dominates, and consecutive draws are not tied together
    freq = frequencies(seq, vocab)
    assert (freq > 0).all() and freq.max().item() < 0.08
    repeats = sum(a == b for a, b in zip(seq, seq[1:], strict=False))
    assert repeats < 30  # ~10 expected for independent uniform draws
    other = [tokens(s, logits, [SamplingParams(temperature=1.0, seed=1235)], [i])[0] for i in range(400)]
    assert sum(a == b for a, b in zip(seq, other, strict=True)) < 30


def test_seeded_batch_rows_with_same_seed_and_index_agree():
    logits = torch.zeros(3, 64)
    p = SamplingParams(temperature=1.0, seed=9)
    got = tokens(sampler(), logits, [p, p, p], [4, 4, 5])
    assert got[0] == got[1]


# ---- logprobs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, logprobs=5),
    SamplingParams(temperature=1.0, logprobs=5, seed=3),
    SamplingParams(temperature=0.5, top_k=3, logprobs=5, seed=4),  # filters do not change reported logprobs
    SamplingParams(temperature=1.3, top_p=0.5, logprobs=2),
])
def test_logprobs_are_log_softmax_of_raw_logits(params):
    logits = random_logits(8, 120, seed=6, scale=2.0)
    expected = logits.log_softmax(dim=-1)
    out = sampler()(logits.clone(), [params] * 8, list(range(8)))
    k = params.logprobs
    for row, t in enumerate(out):
        assert t.logprob == pytest.approx(expected[row, t.token_id].item(), abs=1e-5)
        assert t.rank == 1 + int((expected[row] > expected[row, t.token_id]).sum())
        assert len(t.top_logprobs) == k
        ids = [i for i, _ in t.top_logprobs]
        vals = [v for _, v in t.top_logprobs]
        assert vals == sorted(vals, reverse=True)
        assert ids == expected[row].topk(k).indices.tolist()
        assert vals == pytest.approx(expected[row].topk(k).values.tolist(), abs=1e-5)
        if params.greedy:
            assert t.rank == 1 and ids[0] == t.token_id


def test_logprobs_only_for_rows_that_ask_and_zero_means_chosen_only():
    logits = random_logits(3, 50, seed=8)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=0.0, logprobs=7)]
    out = sampler()(logits.clone(), params, [0, 0, 0])
    assert out[0].logprob is None and out[0].top_logprobs is None
    assert out[1].logprob == pytest.approx(logits[1].log_softmax(-1).max().item(), abs=1e-5)
    assert out[1].rank == 1 and out[1].top_logprobs == []
    assert len(out[2].top_logprobs) == 7


def test_logprob_rank_of_an_unlikely_sampled_token():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    p = SamplingParams(temperature=1.0, top_k=4, logprobs=1, seed=0)
    s = sampler()
    seen = set()
    for i in range(300):
        t = s(logits.clone(), [p], [i])[0]
        assert t.rank == t.token_id + 1  # logits are strictly decreasing with the id
        assert t.top_logprobs[0][0] == 0
        seen.add(t.token_id)
    assert seen == {0, 1, 2, 3}


# ---- min_tokens ----------------------------------------------------------------------------------------


def test_min_tokens_bans_eos_and_stop_token_ids():
    logits = torch.zeros(1, 20)
    logits[0, EOS], logits[0, 5], logits[0, 9] = 10.0, 9.0, 8.0
    s = sampler()
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    assert tokens(s, logits, [p], [0]) == [9]
    assert tokens(s, logits, [p], [2]) == [9]
    assert tokens(s, logits, [p], [3]) == [EOS]  # min_tokens reached: no more bans
    q = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5], ignore_eos=True)
    assert tokens(s, logits, [q], [0]) == [EOS]  # ignore_eos: EOS is an ordinary token, only 5 is banned
    r = SamplingParams(temperature=0.0)
    assert tokens(s, logits.repeat(2, 1), [p, r], [0, 0]) == [9, EOS]  # the ban is per row


def test_min_tokens_bans_under_random_sampling():
    logits = torch.zeros(2000, 8)
    logits[:, EOS] = 3.0
    logits[:, 6] = 2.0
    p = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[6])
    got = tokens(sampler(), logits, [p] * 2000)
    assert EOS not in got and 6 not in got and len(set(got)) == 6


# ---- through the engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, dtype="float32", max_model_len=256, threads_per_worker=1) as engine:
        yield engine


def prompt(n: int, start: int = 10) -> dict:
    return {"prompt_token_ids": [(start + 7 * i) % 300 + 3 for i in range(n)]}


def test_seeded_prompt_same_alone_and_in_a_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=77, max_tokens=16, ignore_eos=True)
    target = prompt(11, start=5)
    alone = llm.generate([target], seeded)[0].outputs[0].token_ids
    assert len(alone) == 16
    others = [prompt(n, start=s) for n, s in [(3, 1), (40, 2), (7, 3), (25, 4), (60, 6)]]
    other_params = [SamplingParams(temperature=1.0, max_tokens=n) for n in (5, 20, 9, 16, 30)]
    other_params[1] = SamplingParams(temperature=0.0, max_tokens=20)
    other_params[3] = SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=16)
    for pos in (0, 2, 5):
        prompts = others[:pos] + [target] + others[pos:]
        params = other_params[:pos] + [seeded] + other_params[pos:]
        outs = llm.generate(prompts, params)
        assert outs[pos].outputs[0].token_ids == alone, pos


def test_seeded_output_repeats_across_calls(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=2024, max_tokens=20, ignore_eos=True)
    prompts = [prompt(5), prompt(30, start=9)]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    second = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert first == second
    other = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(
        temperature=1.0, top_p=0.9, seed=2025, max_tokens=20, ignore_eos=True))]
    assert other != first


def test_logprobs_through_generate(llm):
    params = [SamplingParams(temperature=0.0, logprobs=3, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=1, logprobs=3, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=2, max_tokens=8, ignore_eos=True)]
    outs = llm.generate([prompt(9), prompt(9), prompt(9)], params)
    for o, p in zip(outs[:2], params[:2], strict=True):
        c = o.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == 8
        chosen = []
        for tok, entry in zip(c.token_ids, c.logprobs, strict=True):
            assert len(entry) in (3, 4)
            assert tok in entry
            ranks = sorted(lp.rank for lp in entry.values())
            assert ranks[:3] == [1, 2, 3]
            if len(entry) == 4:
                assert entry[tok].rank > 3
            top = sorted(entry.values(), key=lambda lp: lp.rank)[:3]
            assert [lp.logprob for lp in top] == sorted((lp.logprob for lp in top), reverse=True)
            assert all(lp.logprob <= 0 for lp in entry.values())
            assert math.log(sum(math.exp(lp.logprob) for lp in top)) <= 1e-5
            if p.greedy:
                assert entry[tok].rank == 1
            chosen.append(entry[tok].logprob)
        assert c.cumulative_logprob == pytest.approx(sum(chosen), abs=1e-6)
    assert outs[2].outputs[0].logprobs is None and outs[2].outputs[0].cumulative_logprob is None


def test_seeded_and_greedy_outputs_survive_preemption(tiny_model, llm):
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=24, ignore_eos=True) for i in range(3)]
    params += [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)]
    prompts = [prompt(20, start=s) for s in range(4)]
    roomy = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    # 4 requests of 44 tokens each in a 96-token cache: the scheduler must preempt and recompute.
    with LLM(tiny_model, dtype="float32", max_model_len=64, block_size=4, num_kv_blocks=24,
             threads_per_worker=1) as tight:
        cramped = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
        assert sum(s.num_preemptions for s in tight.engine.stats()) > 0
    assert cramped == roomy
