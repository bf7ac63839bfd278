"""The contracts between engine and stages. The architecture is these types.

One step of a virtual engine (one `Scheduler` over its own KV pool):
`Scheduler.schedule() -> SchedulerOutput -> stages -> StepOutput -> Scheduler.update()`.
Everything here is small and picklable: it crosses process and machine boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeserve.sampling_params import SamplingParams

if TYPE_CHECKING:  # the contracts name tensors; importing them (the engine's side, a plan) needs no torch
    import torch

# The input id of a decode planned before its previous token reached the host (async scheduling): the stage
# takes the token from the ids it sampled last (worker/sampled_ids.py).
PLACEHOLDER = -1


@dataclass
class ScheduledRequest:
    """One request's share of a step: which tokens to compute, where their KV goes, whether to sample.

    Plans are incremental, as vLLM's NewRequestData / CachedRequestData: the stages keep each request's block
    table and sampling params between steps (`worker/request_states.py`), so an entry carries the whole table
    and the params only when `new` (the stages do not know the request: its first step, after a preemption,
    or in a new generation of the group), and otherwise only the blocks appended since its last step. A stage
    resolves the plan back to whole tables, and `sampling_params` set exactly when the step samples.
    """

    req_id: str
    token_ids: list[int]  # the tokens computed this step (a prefill chunk, or the one decode token)
    start_pos: int  # = num_computed_tokens before this step; positions are start_pos .. start_pos+len-1
    block_table: list[int]  # new: the request's physical KV blocks in order; else the blocks appended since
    sampling_params: SamplingParams | None  # new: the request's params; resolved: set only when it samples
    num_output_tokens: int = 0  # outputs so far: makes seeded sampling independent of batch and preemption
    # After a recovery: stages after this one still hold these tokens' KV, so only stages up to it recompute
    # them (the replaced stage needs the activations of those before it). None: every stage computes them.
    last_stage: int | None = None
    new: bool = True
    samples: bool = False  # this step samples the request's next token
    # Penalties need every token the request has seen. A `new` entry of a penalized request carries the tokens
    # before `start_pos` (a cached prefix, or earlier outputs); the stages extend that with each entry's tokens,
    # and a resolved entry that samples carries them all (`seen_token_ids`, up to `context_len`).
    prefix_token_ids: list[int] | None = None
    seen_token_ids: list[int] | None = None
    # Prompt logprobs need each prompt position's next token, which may lie in a later chunk: a `new` entry of
    # a request that asks for them carries its whole prompt, and the stages keep it.
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None  # resolved: how many alternatives, when this chunk scores prompt tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return self.start_pos > 0 and len(self.token_ids) == 1


@dataclass
class DecodeBatch:
    """The step's decodes of requests the stages already know, as columns: the common entry of a step, and
    the one whose cost grows with the batch. Columns of ints pickle about 30x faster than one object per
    request, on the engine that sends every step and on every stage that receives it. Each request computes
    its last token at `start_pos` and samples; its table grows by `new_blocks[req_id]`, if any."""

    req_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    start_pos: list[int] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)
    new_blocks: dict[str, list[int]] = field(default_factory=dict)  # only requests that got blocks

    def __len__(self) -> int:
        return len(self.req_ids)


@dataclass
class SchedulerOutput:
    """What one virtual engine asks the stages to run in one step: `decodes` (see DecodeBatch), then every
    other entry in `requests`. A stage resolves the plan into one whose `requests` hold every entry whole,
    decodes first, and whose `decodes` is empty."""

    step_id: int
    virtual_engine: int
    requests: list[ScheduledRequest] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # the stages drop what they keep of these
    decodes: DecodeBatch = field(default_factory=DecodeBatch)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(r.num_tokens for r in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests and not self.decodes

    def for_stage(self, stage: int) -> SchedulerOutput:
        """The part of the step pipeline stage `stage` computes (all of it, unless a recovery is catching up;
        columnar decodes are never catch-up work)."""
        mine = [r for r in self.requests if r.last_stage is None or stage <= r.last_stage]
        if len(mine) == len(self.requests):
            return self
        return SchedulerOutput(self.step_id, self.virtual_engine, mine, self.finished_req_ids, self.decodes)

    @property
    def kind(self) -> str:
        """prefill, decode or mixed: for traces and logs."""
        decodes = sum(r.is_decode for r in self.requests)
        if decodes == len(self.requests):
            return "decode"
        return "prefill" if decodes == 0 and not self.decodes else "mixed"


@dataclass
class IntermediateTensors:
    """What stage i hands stage i+1: the residual stream, split as vLLM does (hidden, residual)."""

    hidden_states: torch.Tensor  # (T, hidden)
    residual: torch.Tensor  # (T, hidden)


@dataclass
class SampledToken:
    """A sampled token, with its log-probability and the top alternatives when asked for."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class StepOutput:
    """What the last stage returns to the engine: the sampled token per sampling request, and the token with
    its logprobs for the requests that asked (plain ints for the rest: they cross a process boundary every
    step)."""

    step_id: int
    virtual_engine: int
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, SampledToken] = field(default_factory=dict)
    # Requests that asked for prompt logprobs: (the prompt position of the first entry, one entry per prompt
    # token from there, each scored given the tokens before it).
    prompt_logprobs: dict[str, tuple[int, list[SampledToken]]] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryProfile:
    """What one rank's device can give its KV pool, measured after loading its weights (engine/kv_sizing.py), sent to
    the engine in a MemoryProfiled message.

    `used_bytes` is everything in use on the device (every process on it) with no KV pool allocated and no
    step running; `activation_bytes` the peak a step at the largest batch adds; `graph_bytes` what the CUDA
    graphs will take (their pool and static buffers), 0 where there are none."""

    device: str  # the physical device: ranks with the same id share its memory
    total_bytes: int
    used_bytes: int
    activation_bytes: int
    graph_bytes: int
    kv_bytes_per_block: int  # one block of one virtual engine on this rank (its layers, its KV heads)
