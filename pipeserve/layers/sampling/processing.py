"""The sampler's tensor work on the logits' device: bias, penalties, bans, filters and the exponential race.

Every function takes the whole batch (or the random rows) at once; the host only decided, from the params,
which of them run.
"""

from __future__ import annotations

import torch

from pipeserve.layers.sampling.noise import exponential_noise
from pipeserve.layers.sampling.step_params import StepParams


def _pairs(section: torch.Tensor, parts: int) -> torch.Tensor:
    return section.view(parts, -1).long()  # (parts, N): rows, token ids[, ...]


def adjust_logits(logits: torch.Tensor, step: StepParams) -> torch.Tensor:
    """As vLLM orders them: logit bias, the repetition penalty (prompt and output tokens), the frequency and
    presence penalties (output tokens only), then the min_tokens bans. `logits`: (S, V) float32, not changed."""
    dev = step.dev
    if not any(name in dev for name in ("bias", "pen", "ban")):
        return logits
    logits = logits.clone()
    if "bias" in dev:
        rows, toks = _pairs(dev["bias"], 3)[:2]
        vals = dev["bias"].view(3, -1)[2].float()  # (N,)
        logits.index_put_((rows, toks), vals, accumulate=True)
    if "seen" in dev:
        rows, toks = _pairs(dev["seen"], 2)
        seen = torch.zeros_like(logits, dtype=torch.bool)  # (S, V)
        seen.index_put_((rows, toks), seen.new_ones(()))
        penalty = dev["pen"].view(-1, 3)[:, 0:1].float()  # (S, 1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)  # (S, V)
        logits = torch.where(seen, penalized, logits)
    if "outputs" in dev:
        rows, toks = _pairs(dev["outputs"], 2)
        counts = torch.zeros_like(logits).index_put_((rows, toks), torch.ones_like(toks, dtype=logits.dtype),
                                                     accumulate=True)  # (S, V)
        pen = dev["pen"].view(-1, 3).float()  # (S, 3)
        logits -= pen[:, 1:2] * counts + pen[:, 2:3] * (counts > 0).to(logits.dtype)
    if "ban" in dev:
        rows, toks = _pairs(dev["ban"], 2)
        logits.index_put_((rows, toks), logits.new_full((), float("-inf")))  # a device fill: no copy
    return logits


def sample_random_rows(logits: torch.Tensor, step: StepParams, hashes: torch.Tensor) -> torch.Tensor:
    """(R,) token ids drawn for the random rows of `logits` (S, V), float32, already adjusted."""
    probs = filtered_probs(logits, step)  # (R, V)
    noise = exponential_noise(step.dev["rand"].view(-1, 5)[:, 4].to(torch.int32), hashes)  # (R, V)
    # Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. is a draw from p (no renormalisation needed)
    return (probs / noise).argmax(dim=-1)


def filtered_probs(logits: torch.Tensor, step: StepParams) -> torch.Tensor:
    """(R, V) the random rows' probabilities after temperature, top-k, top-p and min-p, not renormalised."""
    cols = step.dev["rand"].view(-1, 5)  # (R, 5)
    if not step.all_random:
        logits = logits.index_select(0, step.dev["rand_idx"].long())  # (R, V)
    x = logits / cols[:, 0:1].float()  # (R, V) temperature
    if step.max_top_k:
        x = _top_k(x, cols[:, 1].long(), step.max_top_k)
    probs = x.softmax(dim=-1)  # (R, V)
    if step.any_top_p:
        probs = _top_p(probs, cols[:, 2:3].float())
    if step.any_min_p:
        # keeps tokens at least min_p times as likely as the top one; min_p 0 drops nothing
        probs = probs.masked_fill(probs < cols[:, 3:4].float() * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def _top_k(x: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Keeps each row's top_k largest logits (ties with the k-th kept too); top_k 0: the whole row.
    The threshold comes from `topk(max_k)`, not from sorting the vocabulary."""
    kth_vals = x.topk(max_k, dim=-1).values  # (R, max_k), descending
    kth = kth_vals.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))  # (R, 1)
    kth = kth.masked_fill(top_k.unsqueeze(1) == 0, float("-inf"))
    return x.masked_fill(x < kth, float("-inf"))


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p (R, 1); sorts the rows."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (R, V)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly above each token
    drop_sorted = before >= top_p  # (R, V)
    return probs.masked_fill(drop_sorted.scatter(1, order, drop_sorted), 0.0)
