"""Logprob records computed on the device and packed with the sampled ids into one tensor for the host."""

from __future__ import annotations

import torch

from pipeserve.layers.sampling.host_pack import to_host
from pipeserve.types import SampledToken


def logprob_columns(logits: torch.Tensor, chosen_ids: torch.Tensor, num_top: int) -> list[torch.Tensor]:
    """Per row of `logits` (W, V): the log-probability of `chosen_ids` (W,), its rank (1 = most likely) and
    the `num_top` most likely tokens with theirs, as flat float64 columns ready for `torch.cat`."""
    logprobs = logits.float().log_softmax(dim=-1)  # (W, V)
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1))  # (W, 1)
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # (W,)
    cols = [chosen.flatten().double(), ranks.double()]
    if num_top:
        top_vals, top_ids = logprobs.topk(num_top, dim=-1)  # (W, K) each, descending
        cols += [top_vals.flatten().double(), top_ids.flatten().double()]
    return cols


def unpack_records(flat: list[float], token_ids: list[int], tops: list[int], num_top: int) -> list[SampledToken]:
    """The inverse of `logprob_columns` on the host: W records, record j keeping its first `tops[j]`
    alternatives out of the `num_top` computed."""
    w = len(token_ids)
    chosen, ranks = flat[:w], flat[w: 2 * w]
    vals, ids = flat[2 * w: 2 * w + w * num_top], flat[2 * w + w * num_top:]
    out = []
    for j, (t, k) in enumerate(zip(token_ids, tops, strict=True)):
        row = slice(j * num_top, j * num_top + k)
        top = [(int(i), v) for i, v in zip(ids[row], vals[row], strict=True)]
        out.append(SampledToken(t, chosen[j], int(ranks[j]), top))
    return out


def score_tokens(logits: torch.Tensor, targets: list[int], num_top: int) -> list[SampledToken]:
    """Row i's log-probability of targets[i], its rank, and the `num_top` most likely tokens (prompt logprobs).
    One copy each way between host and device."""
    pinned = logits.device.type == "cuda"
    target = torch.tensor(targets, dtype=torch.long, pin_memory=pinned)  # (N,)
    if logits.device.type != "cpu":
        target = target.to(logits.device, non_blocking=pinned)
    flat = to_host(torch.cat(logprob_columns(logits, target, num_top))).tolist()
    return unpack_records(flat, targets, [num_top] * len(targets), num_top)
