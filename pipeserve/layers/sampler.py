"""Turns the last stage's logits into tokens: logit bias, penalties, greedy, temperature, top-k, top-p, min-p,
seeds, logprobs."""

from __future__ import annotations

import torch

from pipeserve.sampling_params import SamplingParams
from pipeserve.types import SampledToken

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, output index) pairs over the generator's seed space


class Sampler:
    """Samples one token per row of logits.

    A seeded request draws its randomness from (seed, number of tokens it has output so far) alone, so it
    samples the same tokens whatever else shares the batch, and after a preemption too. Unseeded requests
    share one generator seeded from the engine seed.
    """

    def __init__(self, seed: int, eos_token_ids: tuple[int, ...]):
        self.generator = torch.Generator().manual_seed(seed)
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], num_outputs: list[int],
                 seen: list[list[int] | None] | None = None) -> list[SampledToken]:
        """`seen[i]`: every token row i's request has seen (prompt, then its outputs), for penalties."""
        raw = logits.float().cpu()  # (S, V); sampling state (generators) lives on the CPU
        logits = self._apply_bias_and_penalties(raw, params, num_outputs, seen or [None] * len(params))
        logits = self._apply_min_tokens(logits, params, num_outputs)
        token_ids = logits.argmax(dim=-1)  # greedy rows keep this
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows)
            probs = self._filtered_probs(logits[rows], [params[i] for i in random_rows])
            for j, i in enumerate(random_rows):
                noise = torch.empty_like(probs[j]).exponential_(generator=self._generator(params[i], num_outputs[i]))
                token_ids[i] = (probs[j] / noise).argmax()  # exponential race: a draw from probs
        return self._with_logprobs(raw, token_ids, params)  # logprobs of the model itself, before any ban

    @staticmethod
    def _apply_bias_and_penalties(logits: torch.Tensor, params: list[SamplingParams], num_outputs: list[int],
                                  seen: list[list[int] | None]) -> torch.Tensor:
        """As vLLM orders them: logit bias, then the repetition penalty (prompt and output tokens), then the
        frequency and presence penalties (output tokens only)."""
        rows = [i for i, p in enumerate(params) if p.logit_bias or p.penalized]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            p, row = params[i], logits[i]
            if p.logit_bias:
                row[torch.tensor(list(p.logit_bias))] += torch.tensor(list(p.logit_bias.values()))
            if not p.penalized:
                continue
            tokens = seen[i]
            if tokens is None:
                raise RuntimeError("a penalized request reached the sampler without the tokens it has seen")
            if p.repetition_penalty != 1.0:
                ids = torch.tensor(tokens, dtype=torch.long).unique()
                x = row[ids]
                row[ids] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            k = num_outputs[i]
            if k and (p.frequency_penalty or p.presence_penalty):
                counts = torch.bincount(torch.tensor(tokens[len(tokens) - k:], dtype=torch.long),
                                        minlength=row.numel()).float()
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, params: list[SamplingParams],
                          num_outputs: list[int]) -> torch.Tensor:
        rows = [i for i, p in enumerate(params) if num_outputs[i] < p.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            p = params[i]
            banned = list(p.stop_token_ids or []) + ([] if p.ignore_eos else self.eos_token_ids)
            logits[i, banned] = float("-inf")
        return logits

    def _generator(self, p: SamplingParams, num_outputs: int) -> torch.Generator:
        if p.seed is None:
            return self.generator
        return torch.Generator().manual_seed((p.seed * _SEED_MIX + num_outputs) % (1 << 63))

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params]).unsqueeze(1)
        logits = logits / temps
        top_k = [p.top_k for p in params]
        if any(k > 0 for k in top_k):
            vocab = logits.shape[-1]
            ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k]).unsqueeze(1)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, ks - 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
        if (top_p < 1.0).any():
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly above each token
            drop_sorted = before >= top_p  # keeps the smallest prefix whose mass reaches top_p
            probs = probs.masked_fill(drop_sorted.scatter(1, order, drop_sorted), 0.0)
        min_p = torch.tensor([p.min_p for p in params]).unsqueeze(1)
        if (min_p > 0).any():
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs / probs.sum(dim=-1, keepdim=True)

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                       params: list[SamplingParams]) -> list[SampledToken]:
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        out = [SampledToken(int(t)) for t in token_ids.tolist()]
        if not want:
            return out
        rows = torch.tensor(want)
        logprobs = logits[rows].log_softmax(dim=-1)  # the model's distribution, before sampling filters
        chosen = logprobs.gather(1, token_ids[rows].unsqueeze(1))  # (W, 1)
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        max_k = max(params[i].logprobs for i in want)
        top_vals, top_ids = logprobs.topk(max(max_k, 1), dim=-1)
        for j, i in enumerate(want):
            k = params[i].logprobs
            top = list(zip(top_ids[j, :k].tolist(), top_vals[j, :k].tolist(), strict=True))
            out[i] = SampledToken(out[i].token_id, float(chosen[j, 0]), int(ranks[j]), top)
        return out


def score_tokens(logits: torch.Tensor, targets: list[int], num_top: int) -> list[SampledToken]:
    """Row i's log-probability of targets[i], its rank, and the `num_top` most likely tokens (prompt logprobs)."""
    logprobs = logits.float().log_softmax(dim=-1)
    target = torch.tensor(targets, dtype=torch.long, device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, target)
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    top_vals, top_ids = logprobs.topk(max(num_top, 1), dim=-1)
    top_vals, top_ids, chosen = top_vals[:, :num_top].tolist(), top_ids[:, :num_top].tolist(), chosen[:, 0].tolist()
    return [SampledToken(t, c, r, list(zip(ids, vals, strict=True)))
            for t, c, r, ids, vals in zip(targets, chosen, ranks, top_ids, top_vals, strict=True)]
