"""A request's state inside the engine: its tokens, progress and status."""

from __future__ import annotations

import enum

from pipeserve.engine.block_hashing import extend_block_hashes
from pipeserve.sampling_params import SamplingParams
from pipeserve.types import SampledToken, ScheduledRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


class Request:
    """Prompt plus outputs so far; `num_computed_tokens` of them have KV in the cache."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 max_tokens: int, prompt: str | None = None, cache_salt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens  # resolved: never None here
        self.output_token_ids: list[int] = []  # appended only through append_output (keeps num_tokens)
        self.num_tokens = len(self.prompt_token_ids)  # prompt + outputs: read on every step, so kept, not counted
        self.output_logprobs: list[SampledToken] = []
        # With prompt_logprobs: entry i scores prompt token i + 1 (the first prompt token has none).
        self.prompt_logprobs: list[SampledToken] = []
        self.num_computed_tokens = 0
        self.num_inflight_tokens = 0  # planned in steps still in flight: KV not counted as computed yet
        self.epoch = 0  # bumped whenever results of its steps in flight must no longer count
        # How many of its blocks the stages hold (None: they do not know the request; its next entry is whole).
        self.blocks_sent: int | None = None
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.num_failed_steps = 0  # consecutive steps of this request lost to a stage failure
        # Catching up after a recovery: stages after `catch_up_stage` still hold KV for the first
        # `kv_held_tokens` tokens, so only stages up to it recompute them.
        self.kv_held_tokens = 0
        self.catch_up_stage: int | None = None
        # Prefix caching: hashes of the leading full blocks of prompt + outputs, extended as needed, and how
        # many prompt tokens the cache supplied when the request was first admitted (None: not admitted yet).
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []
        self.num_cached_tokens: int | None = None
        self.held_for: Request | None = None  # queued only once this sibling has computed the shared prompt
        self.stop_ids: frozenset[int] = frozenset()  # set by the scheduler: tokens that may end it
        # It ends by length here; validation (`validate_request`) keeps this within max_model_len.
        self.length_limit = len(self.prompt_token_ids) + max_tokens
        self.stop_strings = sampling_params.stop_strings

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    def full_block_hashes(self, num_tokens: int, block_size: int) -> list[bytes]:
        """The prefix-cache hashes of the full blocks among its first `num_tokens` tokens (computed once, kept)."""
        return extend_block_hashes(self.block_hashes, self.token_ids_from, num_tokens, block_size, self.cache_salt)

    def token_ids_from(self, start: int, n: int) -> list[int]:
        """Tokens [start, start + n) of prompt + outputs, without copying the whole sequence."""
        prompt = self.prompt_token_ids
        if start >= len(prompt):
            return self.output_token_ids[start - len(prompt): start - len(prompt) + n]
        head = prompt[start: start + n]
        return head + self.output_token_ids[: n - len(head)] if len(head) < n else head

    def plan_entry(self, n: int, start: int, table: list[int]) -> ScheduledRequest:
        """Its plan entry for `n` tokens from token `start`, `table` its block table: whole if the stages do not
        know it, else only its new blocks."""
        num_outputs = self.num_tokens - len(self.prompt_token_ids)
        new = self.blocks_sent is None
        blocks = self.take_unsent_blocks(table)
        params = self.sampling_params
        return ScheduledRequest(
            req_id=self.request_id,
            token_ids=self.token_ids_from(start, n),
            start_pos=start,
            block_table=blocks,
            sampling_params=params if new else None,
            num_output_tokens=num_outputs,
            last_stage=self.catch_up_stage if start < self.kv_held_tokens else None,
            new=new,
            samples=start + n == self.num_tokens,
            prefix_token_ids=self.token_ids_from(0, start) if new and params.penalized else None,
            prompt_token_ids=self.prompt_token_ids if new and params.prompt_logprobs is not None else None,
        )

    def take_unsent_blocks(self, table: list[int]) -> list[int]:
        """The blocks of its table (`table`) its next plan entry carries: those the stages do not hold yet (the
        whole table when they do not know the request), counted as sent from here on."""
        sent = self.blocks_sent or 0
        self.blocks_sent = len(table)
        return table[sent:]

    def record_prompt_logprobs(self, chunk: tuple[int, list] | None) -> None:
        """Keep a chunk's prompt logprobs; positions already kept (recomputed after a preemption) are skipped."""
        if chunk is None:
            return
        first, entries = chunk
        have = len(self.prompt_logprobs)
        if first <= have:
            self.prompt_logprobs.extend(entries[have - first:])

    def forget_in_flight(self) -> None:
        """Its steps in flight will not count: drop their tokens and make their late results stale."""
        self.num_inflight_tokens = 0
        self.epoch += 1

    def stop_catching_up(self) -> None:
        self.kv_held_tokens, self.catch_up_stage = 0, None

    def finish(self, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        self.status, self.stop_reason = status, stop_reason
