"""The batched sampler's semantics on the CPU, which runs the same code as a GPU: greedy, seeded draws that do
not depend on the batch, filters against a sort-based reference, the sampled distribution, and one host
transfer per step."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from pipeserve import SamplingParams
from pipeserve.layers.sampler import Sampler, score_tokens
from pipeserve.layers.sampling.noise import exponential_noise, token_hashes
from pipeserve.layers.sampling.processing import filtered_probs
from pipeserve.layers.sampling.step_params import build_step_params

EOS = 2


def logits_of(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def ids(s: Sampler, logits, params, num_outputs=None, seen=None) -> list[int]:
    return [t.token_id for t in s(logits, params, num_outputs or [0] * len(params), seen)]


# ---- greedy --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_of_the_float_logits(dtype):
    logits = logits_of(9, 301, seed=0).to(dtype)
    got = ids(Sampler(0, (EOS,)), logits, [SamplingParams(temperature=0.0)] * 9)
    assert got == logits.float().argmax(dim=-1).tolist()


@pytest.mark.parametrize(("params", "num_outputs", "plain"), [
    (SamplingParams(temperature=0.0), 0, True),
    (SamplingParams(temperature=0.0, min_tokens=2), 2, True),  # its bans no longer apply
    (SamplingParams(temperature=0.0, min_tokens=2), 1, False),
    (SamplingParams(temperature=0.0, logit_bias={EOS: -100.0}), 0, False),
    (SamplingParams(temperature=0.0, repetition_penalty=1.2), 0, False),
    (SamplingParams(temperature=0.0, logprobs=0), 0, False),
    (SamplingParams(temperature=0.5, seed=1), 0, False),
])
def test_plain_greedy_rows_take_the_raw_argmax(params, num_outputs, plain):
    """Only rows whose token is the raw argmax take the argmax shortcut; the others still see their bans,
    bias, penalties and records (EOS is the argmax of every row here)."""
    logits = logits_of(2, 40, seed=3)
    logits[:, EOS] = 50.0
    rows = [SamplingParams(temperature=0.0), params]
    assert Sampler.plain_greedy(rows, [num_outputs] * 2) is plain
    got = Sampler(0, (EOS,))(logits, rows, [num_outputs] * 2, [[1, EOS]] * 2)
    assert got[0].token_id == EOS
    assert (got[1].token_id == EOS) is not (params.logit_bias or num_outputs < params.min_tokens)
    assert (got[1].logprob is not None) is (params.logprobs is not None)


def test_device_half_returns_the_same_ids():
    logits = logits_of(5, 64, seed=1)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3, logprobs=2)] * 2
    params.append(SamplingParams(temperature=0.7, top_k=5, seed=4))
    device_ids, packed, _ = Sampler(0, (EOS,)).sample(logits, params, [1] * 5)
    assert device_ids.tolist() == ids(Sampler(0, (EOS,)), logits, params, [1] * 5)
    assert packed.dtype == torch.float64 and packed[:5].tolist() == device_ids.tolist()


# ---- seeds: the same token alone and in any batch ------------------------------------------------------

OTHERS = [  # every kind of row a batch can hold beside a seeded one
    (SamplingParams(temperature=0.0), None),
    (SamplingParams(temperature=1.0), None),
    (SamplingParams(temperature=0.8, top_k=7, top_p=0.9, seed=11), None),
    (SamplingParams(temperature=1.2, min_p=0.1, logprobs=3), None),
    (SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5, seed=5), [3, 4, 5, 9]),
    (SamplingParams(temperature=0.0, logit_bias={1: 50.0}), None),
    (SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[7]), None),
]

TARGETS = [
    (SamplingParams(temperature=1.0, seed=0), None),
    (SamplingParams(temperature=0.7, top_p=0.8, seed=2**40), None),
    (SamplingParams(temperature=1.3, top_k=20, min_p=0.02, seed=-3), None),
    (SamplingParams(temperature=1.0, frequency_penalty=0.7, repetition_penalty=1.2, seed=9, logprobs=2), [1, 8, 8]),
]


@pytest.mark.parametrize("target", range(len(TARGETS)))
def test_seeded_row_same_alone_and_in_any_batch(target):
    vocab = 97
    p, seen = TARGETS[target]
    row = logits_of(1, vocab, seed=100 + target, scale=1.0)
    others = logits_of(len(OTHERS), vocab, seed=200)
    rng = random.Random(target)
    for n_out in (0, 1, 2, 17):
        alone = ids(Sampler(0, (EOS,)), row, [p], [n_out], [seen])[0]
        for size in (1, 3, len(OTHERS)):
            picked = rng.sample(range(len(OTHERS)), size)
            pos = rng.randint(0, size)
            order = picked[:pos] + [-1] + picked[pos:]  # -1: the target row
            logits = torch.cat([row if i < 0 else others[i:i + 1] for i in order])
            params = [p if i < 0 else OTHERS[i][0] for i in order]
            seens = [seen if i < 0 else OTHERS[i][1] for i in order]
            outs = [n_out if i < 0 else rng.randint(0, 5) for i in order]
            sampler = Sampler(rng.randint(0, 99), (EOS,))  # another engine seed, and some unseeded draws made
            ids(sampler, others, [SamplingParams(temperature=1.0)] * len(OTHERS))
            assert ids(sampler, logits, params, outs, seens)[pos] == alone, (n_out, order)


def test_noise_of_a_key_does_not_depend_on_the_other_keys():
    hashes = token_hashes(1000, "cpu")
    keys = torch.tensor([5, -7, 2**31 - 1, -2**31, 0], dtype=torch.int32)
    batch = exponential_noise(keys, hashes)  # (5, 1000)
    for i in range(len(keys)):
        assert torch.equal(exponential_noise(keys[i:i + 1], hashes)[0], batch[i])
    assert (batch > 0).all()
    assert abs(batch.mean().item() - 1.0) < 0.03  # Exp(1): mean 1, P(E > 1) = 1/e
    assert abs((batch > 1).double().mean().item() - 0.3679) < 0.02


def test_unseeded_draws_repeat_with_the_engine_seed():
    logits = torch.zeros(64, 50)
    params = [SamplingParams(temperature=1.0)] * 64
    a = ids(Sampler(3, (EOS,)), logits, params)
    assert a == ids(Sampler(3, (EOS,)), logits, params)
    assert a != ids(Sampler(4, (EOS,)), logits, params)
    assert len(set(a)) > 20  # each row draws afresh


# ---- filters against a sort-based reference ------------------------------------------------------------


def reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(V,) the filtered, renormalised distribution, computed by sorting the whole row."""
    x = row / p.temperature
    if 0 < p.top_k < x.numel():
        kth = x.sort(descending=True).values[p.top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        mass_before = sorted_p.cumsum(0) - sorted_p
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[mass_before < p.top_p]] = True
        probs = probs * keep
    if p.min_p > 0:
        probs = probs * (probs >= p.min_p * probs.max())
    return probs / probs.sum()


FILTERS = [dict(top_k=1), dict(top_k=5), dict(top_k=40), dict(top_p=0.3), dict(top_p=0.9), dict(min_p=0.05),
           dict(min_p=0.3), dict(top_k=10, top_p=0.6), dict(top_k=30, min_p=0.1), dict(top_p=0.95, min_p=0.02),
           dict(top_k=200), dict()]


def test_filters_equal_the_sort_based_reference():
    vocab = 150
    logits = logits_of(len(FILTERS) * 2, vocab, seed=7)
    params = [SamplingParams(temperature=t, **f) for f in FILTERS for t in (0.6, 1.4)]
    params.insert(3, SamplingParams(temperature=0.0))  # a greedy row among them: not a random row
    logits = torch.cat([logits[:3], logits_of(1, vocab, seed=8), logits[3:]])
    step = build_step_params(params, [0] * len(params), [None] * len(params), [EOS], vocab, lambda: 0,
                             torch.device("cpu"))
    probs = filtered_probs(logits, step)  # (R, V)
    assert probs.shape[0] == len(params) - 1
    for r, i in enumerate(step.random_rows):
        got = probs[r] / probs[r].sum()
        want = reference_probs(logits[i], params[i])
        assert torch.equal(got > 0, want > 0), params[i]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ---- the sampled distribution --------------------------------------------------------------------------


@pytest.mark.parametrize("filters", [dict(), dict(top_k=5, top_p=0.9)])
def test_seeded_draws_follow_the_distribution(filters):
    vocab, n = 8, 16000
    row = torch.tensor([1.5, 1.0, 0.6, 0.2, 0.0, -0.4, -1.0, -2.0])
    params = [SamplingParams(temperature=1.0, seed=s, **filters) for s in range(n)]  # one row per seed
    got = ids(Sampler(0, (EOS,)), row.repeat(n, 1), params)
    expected = reference_probs(row, params[0]).double() * n  # (V,)
    observed = torch.bincount(torch.tensor(got), minlength=vocab).double()
    support = expected > 0
    assert (observed[~support] == 0).all()
    chi2 = ((observed[support] - expected[support]) ** 2 / expected[support]).sum().item()
    # at most 7 degrees of freedom: P(chi2 > 30) < 1e-4; fixed seeds, so this cannot flake
    assert chi2 < 30, (chi2, observed.tolist(), expected.tolist())


# ---- batched penalties, bias and bans equal one row at a time ------------------------------------------


def test_batched_adjustments_equal_single_rows():
    vocab = 60
    logits = logits_of(6, vocab, seed=9)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.8), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, frequency_penalty=1.1, presence_penalty=-0.4, logit_bias={3: 4.0}),
              SamplingParams(temperature=0.0, min_tokens=5, stop_token_ids=[11], logit_bias={11: 90.0}),
              SamplingParams(temperature=0.0, repetition_penalty=0.5, frequency_penalty=2.0),
              SamplingParams(temperature=0.0, logit_bias={0: -3.0, 59: 2.5})]
    seen = [[1, 2, 2, 40], None, [5, 7, 7, 7, 3], None, [8, 8, 9, 10, 10, 10], None]
    outs = [2, 0, 3, 1, 4, 0]
    s = Sampler(0, (EOS,))
    batched = ids(s, logits, params, outs, seen)
    assert batched == [ids(s, logits[i:i + 1], [params[i]], [outs[i]], [seen[i]])[0] for i in range(6)]
    assert batched[3] not in (11, EOS)


# ---- one host transfer per step ------------------------------------------------------------------------


class HostTransfers:
    """Counts the calls that bring tensor data to the host; data already brought (a transfer's result) is
    free to read. A TorchDispatchMode does not see these on CPU tensors, so the methods are wrapped."""

    NAMES = ("cpu", "tolist", "item", "numpy", "to", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        self.count, self.fetched, self.saved = 0, set(), {}

    def __enter__(self):
        for name in self.NAMES:
            self.saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            out = original(t, *args, **kwargs)
            if name == "to" and not _to_host(args, kwargs):
                return out  # a dtype or device-side conversion
            if id(t) not in self.fetched:
                self.count += 1
            if isinstance(out, torch.Tensor):
                self.fetched.add(id(out))
            return out
        return counted


def _to_host(args, kwargs) -> bool:
    device = kwargs.get("device", args[0] if args else None)
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


@pytest.mark.parametrize("params", [
    [SamplingParams(temperature=0.0)] * 4,
    [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.0), SamplingParams(top_k=3),
     SamplingParams(top_p=0.5, min_p=0.1, seed=2)],
    [SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.2, logit_bias={4: 1.0},
                    min_tokens=3)] * 4,
    [SamplingParams(temperature=1.0, logprobs=3), SamplingParams(temperature=0.0, logprobs=0),
     SamplingParams(temperature=0.5), SamplingParams(temperature=0.0)],  # logprobs travel with the ids
])
def test_a_step_moves_data_to_the_host_once(params):
    logits = logits_of(4, 80, seed=10)
    seen = [[1, 2, 3]] * 4
    s = Sampler(0, (EOS,))
    s(logits, params, [1] * 4, seen)  # the vocabulary's token hashes are made once, outside the count
    with HostTransfers() as transfers:
        s(logits, params, [1] * 4, seen)
    assert transfers.count == 1


def test_prompt_scoring_moves_data_to_the_host_once():
    logits = logits_of(6, 80, seed=11)
    with HostTransfers() as transfers:
        records = score_tokens(logits, [1, 2, 3, 4, 5, 6], 2)
    assert transfers.count == 1
    expected = logits.log_softmax(dim=-1)
    for row, (t, r) in enumerate(zip([1, 2, 3, 4, 5, 6], records, strict=True)):
        assert r.logprob == pytest.approx(expected[row, t].item(), abs=1e-5)
        assert [i for i, _ in r.top_logprobs] == expected[row].topk(2).indices.tolist()


def test_counter_sees_a_transfer():
    """The counter itself: reading a computed tensor counts, reading what was fetched does not."""
    t = torch.arange(4) * 2
    with HostTransfers() as transfers:
        host = t.to("cpu")
        host.tolist()
        _ = [int(x) for x in host.tolist()]
        t.sum().item()
        t.to(torch.float64)
    assert transfers.count == 2


def test_rows_and_params_must_agree():
    with pytest.raises(ValueError, match="one row per params"):
        Sampler(0, (EOS,))(torch.zeros(3, 10), [SamplingParams()] * 2, [0, 0])


def test_all_combinations_of_row_kinds_run():
    """Every mix of greedy, seeded, unseeded, filtered and penalized rows samples a valid token."""
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
             SamplingParams(temperature=0.9, top_k=4), SamplingParams(top_p=0.5, logprobs=1),
             SamplingParams(min_p=0.2, presence_penalty=1.0)]
    s = Sampler(0, (EOS,))
    for r in range(1, len(kinds) + 1):
        for combo in itertools.combinations(kinds, r):
            got = ids(s, logits_of(r, 30, seed=r), list(combo), [1] * r, [[0, 1]] * r)
            assert all(0 <= t < 30 for t in got)
