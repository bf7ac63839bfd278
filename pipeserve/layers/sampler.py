"""Turns the last stage's logits into tokens on the logits' device: logit bias, penalties, the min_tokens bans,
greedy, temperature, top-k, top-p, min-p, seeds, logprobs. Only the sampled ids (and the logprobs a request
asked for) cross to the host: one copy per step.

What a seed guarantees: the same seed, prompt and sampling params give the same tokens whether the request
runs alone or in any batch, in any order, and after a preemption or a recovery, on the same device type and
dtype. A seeded request's randomness is a pure function of (seed, output index, token id); it does not carry
across pipeserve versions or between devices (a CPU and a GPU compute slightly different probabilities).

Unseeded requests draw from the engine seed: the sampler numbers their draws, one per random row in the
order of the rows of each step, and each draw's key comes from (engine seed, draw number). Runs with the same
engine seed and the same sequence of steps repeat; an unseeded request's tokens depend on what shares its
steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from pipeserve.layers.sampling.host_pack import to_host
from pipeserve.layers.sampling.logprobs import logprob_columns, score_tokens, unpack_records
from pipeserve.layers.sampling.noise import draw_key, token_hashes, unseeded_stream
from pipeserve.layers.sampling.processing import adjust_logits, sample_random_rows
from pipeserve.layers.sampling.step_params import StepParams, build_step_params
from pipeserve.sampling_params import SamplingParams
from pipeserve.types import SampledToken

__all__ = ["Sampler", "score_tokens"]


class Sampler:
    """Samples one token per row of logits, batched on the logits' device."""

    def __init__(self, seed: int, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = list(eos_token_ids)
        self._stream = unseeded_stream(seed)
        self._draws = 0  # unseeded draws so far
        self._hashes: dict[tuple[int, torch.device], torch.Tensor] = {}  # (vocab, device) -> token_hashes

    @staticmethod
    def plain_greedy(params: list[SamplingParams], num_outputs: list[int]) -> bool:
        """Whether every row's token is the argmax of its raw logits: greedy, and nothing changes the logits
        or asks for more than the token (no bias, penalties, min_tokens bans or logprobs)."""
        return all(p.greedy and not p.logit_bias and not p.penalized and p.logprobs is None
                   and k >= p.min_tokens for p, k in zip(params, num_outputs, strict=True))

    @staticmethod
    def greedy_tokens(ids: torch.Tensor) -> list[SampledToken]:
        """The tokens of a `plain_greedy` step from its argmax ids (S,), computed wherever the logits are."""
        return read_plain(to_host(ids).tolist())  # the step's one device-to-host copy

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], num_outputs: list[int],
                 seen: list[list[int] | None] | None = None) -> list[SampledToken]:
        """logits (S, V); per row its request's params, outputs so far, and `seen[i]`: every token it has
        seen (prompt, then outputs), needed only by penalized requests. One token (and record) per row."""
        _, packed, read = self.issue(logits, params, num_outputs, seen)
        return read(to_host(packed).tolist())  # the step's one device-to-host copy

    def issue(self, logits: torch.Tensor, params: list[SamplingParams], num_outputs: list[int],
              seen: list[list[int] | None] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, Callable[[list[float]], list[SampledToken]]]:
        """Sample without waiting for the device: (S,) ids on the logits' device, the tensor to bring to the
        host, and how to read that tensor's values (as a list) into one token per row."""
        if logits.dim() == 2 and logits.shape[0] == len(params) and self.plain_greedy(params, num_outputs):
            # argmax of the logits as they are: a float32 copy has the same maximum at the same index
            ids = logits.argmax(dim=-1)
            return ids, ids, read_plain
        ids, packed, step = self.sample(logits, params, num_outputs, seen)
        return ids, packed, functools.partial(_read_sampled, params, step)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], num_outputs: list[int],
               seen: list[list[int] | None] | None = None) -> tuple[torch.Tensor, torch.Tensor, StepParams]:
        """The device half of `__call__`: (S,) sampled ids and the float64 tensor to copy to the host (the
        ids, then the logprob columns of the rows that asked), both on the logits' device."""
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(num_outputs) != len(params):
            raise ValueError(f"logits {tuple(logits.shape)} need one row per params ({len(params)}) and "
                             f"per num_outputs ({len(num_outputs)})")
        raw = logits.float()  # (S, V)
        step = build_step_params(params, num_outputs, seen or [None] * len(params), self.eos_token_ids,
                                 raw.shape[1], self._next_unseeded_key, raw.device)
        adjusted = adjust_logits(raw, step)  # (S, V)
        ids = adjusted.argmax(dim=-1)  # (S,) greedy rows keep these
        if step.random_rows:
            drawn = sample_random_rows(adjusted, step, self._token_hashes(raw))  # (R,)
            ids = drawn if step.all_random else ids.index_copy(0, step.dev["rand_idx"].long(), drawn)
        cols = [ids.double()]
        if step.logprob_rows:  # the model's own distribution, before bias, penalties, bans and filters
            want = step.dev["want"].long()  # (W,)
            cols += logprob_columns(raw.index_select(0, want), ids.index_select(0, want), step.max_logprobs)
        return ids, (torch.cat(cols) if len(cols) > 1 else cols[0]), step

    def _next_unseeded_key(self) -> int:
        key = draw_key(self._stream, self._draws)
        self._draws += 1
        return key

    def _token_hashes(self, logits: torch.Tensor) -> torch.Tensor:
        where = (logits.shape[1], logits.device)
        if where not in self._hashes:
            self._hashes[where] = token_hashes(*where)
        return self._hashes[where]


def read_plain(flat: list) -> list[SampledToken]:
    """The tokens of a step that brought only its ids to the host."""
    return [SampledToken(int(t)) for t in flat]


def _read_sampled(params: list[SamplingParams], step: StepParams, flat: list[float]) -> list[SampledToken]:
    """The tokens of a `Sampler.sample` step from its packed tensor's values: the ids, then logprob records."""
    token_ids = [int(t) for t in flat[: len(params)]]
    out = [SampledToken(t) for t in token_ids]
    if step.logprob_rows:
        rows = step.logprob_rows
        records = unpack_records(flat[len(params):], [token_ids[i] for i in rows],
                                 [params[i].logprobs for i in rows], step.max_logprobs)
        for i, record in zip(rows, records, strict=True):
            out[i] = record
    return out
