"""A step's sampling parameters as tensors: built once per step on the host, copied to the device once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeserve.layers.sampling.host_pack import HostPack
from pipeserve.layers.sampling.noise import draw_key
from pipeserve.sampling_params import SamplingParams

NO_TOP_P = 2.0  # a top_p no cumulative mass reaches: the row keeps its whole distribution


@dataclass
class StepParams:
    """Host-side facts that decide which kernels a step runs, and device tensors with the per-row values.

    `dev` sections (float64 views; absent when no row needs them):
    rand: (R, 5) temperature, top_k (0: off), top_p, min_p, noise key, for the `random_rows`;
    rand_idx: (R,) the random rows' indices, when some rows are greedy;
    pen: (S, 3) repetition, frequency and presence penalties; seen / outputs: (2, N) rows and token ids
    of every token seen (repetition) and of the outputs (frequency, presence);
    bias: (3, N) rows, token ids and values of logit_bias; ban: (2, N) rows and token ids the min_tokens
    rule forbids; want: (W,) the rows that asked for logprobs.
    """

    num_rows: int
    random_rows: list[int] = field(default_factory=list)
    max_top_k: int = 0
    any_top_p: bool = False
    any_min_p: bool = False
    logprob_rows: list[int] = field(default_factory=list)
    max_logprobs: int = 0
    dev: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def all_random(self) -> bool:
        return len(self.random_rows) == self.num_rows


def build_step_params(params: list[SamplingParams], num_outputs: list[int], seen: list[list[int] | None],
                      eos_token_ids: list[int], vocab: int, unseeded_key: Callable[[], int],
                      device: torch.device) -> StepParams:
    """`unseeded_key()` gives the next key of the engine's stream, for a random row without a seed."""
    step, pack = StepParams(len(params)), HostPack()
    _add_random_rows(step, pack, params, num_outputs, vocab, unseeded_key)
    _add_penalties(pack, params, num_outputs, seen)
    _add_bias_and_bans(pack, params, num_outputs, eos_token_ids)
    step.logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if step.logprob_rows:
        step.max_logprobs = max(params[i].logprobs for i in step.logprob_rows)
        pack.add("want", step.logprob_rows)
    if pack.spans:
        step.dev = pack.to(device)
    return step


def _add_random_rows(step: StepParams, pack: HostPack, params: list[SamplingParams], num_outputs: list[int],
                     vocab: int, unseeded_key: Callable[[], int]) -> None:
    step.random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not step.random_rows:
        return
    cols: list[float] = []
    for i in step.random_rows:
        p = params[i]
        top_k = p.top_k if 0 < p.top_k < vocab else 0
        key = draw_key(p.seed, num_outputs[i]) if p.seed is not None else unseeded_key()
        cols += (p.temperature, top_k, p.top_p if p.top_p < 1.0 else NO_TOP_P, p.min_p, key)
        step.max_top_k = max(step.max_top_k, top_k)
        step.any_top_p |= p.top_p < 1.0
        step.any_min_p |= p.min_p > 0.0
    pack.add("rand", cols)
    if not step.all_random:
        pack.add("rand_idx", step.random_rows)


def _add_penalties(pack: HostPack, params: list[SamplingParams], num_outputs: list[int],
                   seen: list[list[int] | None]) -> None:
    if not any(p.penalized for p in params):
        return
    cols: list[float] = []
    seen_rows: list[int] = []
    seen_toks: list[int] = []
    out_rows: list[int] = []
    out_toks: list[int] = []
    for i, p in enumerate(params):
        cols += (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        if not p.penalized:
            continue
        tokens = seen[i]
        if tokens is None:
            raise RuntimeError("a penalized request reached the sampler without the tokens it has seen")
        if p.repetition_penalty != 1.0:
            seen_rows += [i] * len(tokens)
            seen_toks += tokens
        k = num_outputs[i]
        if k and (p.frequency_penalty or p.presence_penalty):
            out_rows += [i] * k
            out_toks += tokens[len(tokens) - k:]
    pack.add("pen", cols)
    if seen_rows:
        pack.add("seen", seen_rows + seen_toks)
    if out_rows:
        pack.add("outputs", out_rows + out_toks)


def _add_bias_and_bans(pack: HostPack, params: list[SamplingParams], num_outputs: list[int],
                       eos_token_ids: list[int]) -> None:
    rows: list[int] = []
    toks: list[int] = []
    vals: list[float] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            rows += [i] * len(p.logit_bias)
            toks += p.logit_bias.keys()
            vals += p.logit_bias.values()
    if rows:
        pack.add("bias", rows + toks + vals)
    rows, toks = [], []
    for i, p in enumerate(params):
        if num_outputs[i] < p.min_tokens:
            banned = list(p.stop_token_ids or []) + ([] if p.ignore_eos else eos_token_ids)
            rows += [i] * len(banned)
            toks += banned
    if rows:
        pack.add("ban", rows + toks)
